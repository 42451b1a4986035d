# Shortcuts for developers.  The README's two commands (scripts/demo, scripts/test) are what
# CI and a fresh machine use; these assume the virtualenv already exists (scripts/bootstrap).
VENV ?= .venv
PY := $(VENV)/bin

.PHONY: test check demo test-all

# Fast: unit and component tiers only (no sockets beyond memory streams, no root).
test:
	$(PY)/pytest tests/unit tests/component

# Static checks: ruff and mypy --strict.
check:
	$(PY)/ruff check src tests
	$(PY)/mypy

# The demo (needs root): a mesh of namespace hosts with live traffic.
demo:
	scripts/demo

# Everything CI runs: ruff, mypy and every pytest tier (needs root).
test-all:
	scripts/test

# The data-path benchmark (needs root): direct, nodemesh, Consul Connect and haproxy side by
# side in one lab; a table on stdout, every number in bench/results/ (docs/benchmarks.md).
.PHONY: bench
bench:
	$(PY)/python bench/mesh_http.py $(BENCH_ARGS)
