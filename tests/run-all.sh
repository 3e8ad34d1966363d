#!/usr/bin/env bash
# Installs the package into one fresh virtualenv per supported DSPy minor and runs the whole suite
# against the installed wheel (not the source tree). `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True
PYTHON="${PYTHON:-python3}"
DSPY_VERSIONS="${DSPY_VERSIONS:-3.4.1 3.3.1}"
# The shipped price catalog is checked against this LiteLLM price map (`otel-dspy-cost pricing diff`, tested):
# bump the two together, running `pricing diff --append` on the catalog.
LITELLM_VERSION="${LITELLM_VERSION:-1.110.2}"
MLFLOW_VERSION="${MLFLOW_VERSION:-3.17.2}"
PHOENIX_VERSION="${PHOENIX_VERSION:-20.26.1}"
bash tests/install-system-deps.sh
# The observability backends users run, as servers the tests start (tests/test_backends.py): MLflow's tracking
# server and Phoenix, from PyPI, each in a venv of its own (MLflow's graphene breaks on the graphql-core Phoenix
# needs, and both would fight DSPy's pins).
backends=".venv-backends"
for pair in "mlflow mlflow==$MLFLOW_VERSION" "phoenix arize-phoenix==$PHOENIX_VERSION"; do
  set -- $pair
  echo "=== $2: installing into $backends/$1"
  "$PYTHON" -m venv "$backends/$1"
  "$backends/$1/bin/python" -m pip install -q "$2" 2>&1 | { grep -v "^WARNING: Location" || true; }
done
first_version="${DSPY_VERSIONS%% *}"
for version in $DSPY_VERSIONS; do
  # The backend servers are checked with the first DSPy version only (their side does not change with DSPy's).
  if [ "$version" = "$first_version" ]; then export OTEL_DSPY_COST_BACKENDS="$PWD/$backends"
  else unset OTEL_DSPY_COST_BACKENDS; fi
  venv=".venv-dspy-$version"
  echo "=== DSPy $version: installing into $venv"
  "$PYTHON" -m venv "$venv"
  # grep's own "no line left" status is ignored; pip's failure still fails the pipeline (pipefail).
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$venv/bin/python" -m pip install -q ".[test]" "dspy==$version" "litellm==$LITELLM_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$venv/bin/python" -c "import dspy, otel_dspy_cost; assert dspy.__version__ == '$version', dspy.__version__"
  # The test extra's instrumentations are compared against for real; a missing one must fail here, not skip.
  "$venv/bin/python" -c "import openinference.instrumentation.dspy, opentelemetry.instrumentation.genai.dspy, optuna, redis"
  "$venv/bin/ruff" check otel_dspy_cost tests benchmarks grafana docs
  echo "=== DSPy $version: tests"
  # pytest exits 5 when it collects no test: set -e turns that into a failure, never a silent pass.
  "$venv/bin/pytest" -q -p no:cacheprovider
done
