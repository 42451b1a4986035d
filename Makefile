# Shortcuts for developers.  The README's two commands (scripts/demo, scripts/test) are what
# CI and a fresh machine use; these assume the virtualenv already exists (scripts/bootstrap).
VENV ?= .venv
PY := $(VENV)/bin

.PHONY: test check demo test-all

# Fast: unit and component tiers, and the benchmark's own checks (tests/bench: its parsers and
# configs; the checks against real nginx/haproxy/wrk skip where those are missing or not root).
test:
	$(PY)/pytest tests/unit tests/component tests/bench

# Static checks: ruff and mypy --strict.
check:
	$(PY)/ruff check src tests bench
	$(PY)/mypy

# The demo (needs root): a mesh of namespace hosts with live traffic.
demo:
	scripts/demo

# Everything CI runs: ruff, mypy and every pytest tier (needs root).
test-all:
	scripts/test

# The data-path benchmark (needs root): every workload (closed and open loop HTTP/1.1, bulk TCP,
# HTTP/2, gRPC, memory, a piecewise writer) on direct, nodemesh, Consul Connect and haproxy in
# one lab, 3 rounds, ~15 minutes; tables on stdout, every number and a plot in bench/results/
# (docs/benchmarks.md).  E.g. make bench BENCH_ARGS="--quick" or "--workloads c1,open".
.PHONY: bench
bench:
	$(PY)/python bench/mesh_http.py $(BENCH_ARGS)
