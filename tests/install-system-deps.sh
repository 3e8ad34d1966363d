#!/usr/bin/env bash
# Debian packages the tests run for real: Prometheus + promtool (dashboards, alert rules, live scrape),
# redis-server (shared budget ledger), valgrind (benchmarks/instructions.py counts instructions) and chromium
# (the HTML report rendered headless; docs/backends/screenshot.py).
# Installed only when missing; needs root (as CI is).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "=== installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The packages start their own services on install; the tests start their own instances on free ports.
