"""The package layout: stations are packages that import one way only, and every module says its job."""

from __future__ import annotations

import ast
from pathlib import Path

import otel_dspy_cost

PKG = Path(otel_dspy_cost.__file__).parent
ROOT_NAME = "otel_dspy_cost"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours `name` imports at run time, at top level or inside a function (lazy imports
    are still dependencies); imports under `if TYPE_CHECKING:` are not."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == ROOT_NAME}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == ROOT_NAME:
                module = node.module
            else:
                continue
            submodules = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `module` itself (or its __init__)
                found.add(module)
    return found & known


def _station(module: str) -> str:
    """The package (or top-level module) a module belongs to: `otel_dspy_cost.ledgers.sqlite_ledger` ->
    `ledgers`; the package's own `__init__` is the public facade, its own node."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(facade)"


def station_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {_station(m): set() for m in mods}
    for name, path in mods.items():
        for dep in _imports(name, path, set(mods)):
            if _station(dep) != _station(name):
                graph[_station(name)].add(_station(dep))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    graph = station_graph()
    assert {"instrumentation", "budgets", "ledgers", "pricing", "telemetry", "optimizers", "reports",
            "cli"} <= set(graph)
    assert cycles(graph) == [], f"import cycles between packages: {cycles(graph)}"


def test_the_cycle_check_finds_a_cycle():
    # The check itself: a planted back edge (ledgers importing budgets) must be reported.
    graph = station_graph()
    graph["ledgers"] = graph["ledgers"] | {"budgets"}
    assert any({"ledgers", "budgets"} <= set(c) for c in cycles(graph))


def test_the_flow_reads_top_down():
    # The data flow of an LM call, as imports: the lower stations never reach up.
    graph = station_graph()
    below_budgets = {"ledgers", "pricing", "errors", "_context", "_runtime", "_redact", "_attributes", "_validate"}
    assert graph["budgets"] <= below_budgets | {"budgets"}
    assert graph["ledgers"] <= {"errors", "_runtime", "_redact"}
    assert graph["pricing"] <= {"errors", "_validate"}
    for foundation in ("errors", "_context", "_attributes", "_redact", "_validate"):
        assert graph[foundation] == set(), foundation
    assert graph["_runtime"] <= {"_redact"}


def test_every_module_says_its_one_job_first():
    missing = []
    for name, path in sorted(_modules().items()):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or len(doc.splitlines()[0]) < 20:
            missing.append(name)
    assert missing == []


def test_the_public_api_is_unchanged():
    assert sorted(otel_dspy_cost.__all__) == sorted([
        "AdmissionBypassedError", "Budget", "BudgetExceededError", "BudgetSpanProcessor", "CompileResult",
        "DSPyCostInstrumentor", "Estimate", "ForkedBudgetError", "LedgerUnavailableError", "NothingUsableError",
        "ScopeExhaustedError", "UnpricedModelError", "budget", "estimate", "guarded_compile", "instrument",
        "pricing", "process_initializer", "record_run", "scope", "spend_report", "uninstrument"])
    for name in otel_dspy_cost.__all__:
        assert getattr(otel_dspy_cost, name) is not None
    from otel_dspy_cost import errors
    assert otel_dspy_cost.BudgetExceededError is errors.BudgetExceededError
    assert otel_dspy_cost.pricing.CatalogError is errors.CatalogError
    assert otel_dspy_cost.pricing.__name__ == "otel_dspy_cost.pricing"  # the package, with the catalog API
    for name in ("lookup", "PricingResolver", "Catalog", "default_resolver", "UnknownModelError"):
        assert hasattr(otel_dspy_cost.pricing, name), name


def test_every_ledger_implements_the_protocol(tmp_path):
    # Budgets and the `budget` command use only protocol members: each ledger must have them all.
    from otel_dspy_cost.ledgers.failure_policy import GuardedLedger
    from otel_dspy_cost.ledgers.in_process import InProcessLedger
    from otel_dspy_cost.ledgers.protocol import Ledger, SharedLedger
    from otel_dspy_cost.ledgers.redis_ledger import RedisLedger
    from otel_dspy_cost.ledgers.sqlite_ledger import SqliteLedger

    in_process = InProcessLedger()
    assert isinstance(in_process, Ledger) and not in_process.shared
    sqlite = SqliteLedger(str(tmp_path / "l.db"))
    for shared in (sqlite, GuardedLedger(sqlite)):
        assert isinstance(shared, SharedLedger) and shared.shared, type(shared).__name__
    members = {m for m in dir(SharedLedger) if not m.startswith("_")} | {"shared", "url"}
    redis_ledger = RedisLedger.__new__(RedisLedger)  # no server needed to see its members
    redis_ledger.url, redis_ledger.clock = "redis://", lambda: 0.0
    assert {m for m in members if not hasattr(redis_ledger, m)} == set()
