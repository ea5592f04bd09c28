# Quick start: `make run` (rig on 127.0.0.1:8000) and `make test` (the whole suite).
VENV ?= .venv
RIG ?= .rig
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: bootstrap run rig test lint typecheck links monitoring pytest unit integration clean

bootstrap:
	@VENV=$(VENV) scripts/bootstrap

rig: bootstrap
	$(BIN)/xksproxy dev-setup $(RIG) --port $(PORT)

run: rig
	exec $(BIN)/xksproxy serve -c $(RIG)/xksproxy.toml --pid-file $(RIG)/xksproxy.pid

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: bootstrap
	$(BIN)/mypy

# Every relative link of README.md and docs/**/*.md resolves (files and #headings).
links:
	scripts/check-links

# The alert rules (promtool check and unit tests) and the dashboard (docs/operations/monitoring.md).
monitoring: bootstrap
	scripts/check-monitoring

# tests/unit, then tests/integration (pyproject.toml's testpaths); docs/testing.md.
pytest: bootstrap
	$(BIN)/python -m pytest

# No SoftHSM, no sockets, no processes: seconds.
unit: bootstrap
	$(BIN)/python -m pytest tests/unit

integration: bootstrap
	$(BIN)/python -m pytest tests/integration

test: lint typecheck links monitoring pytest

clean:
	rm -rf $(VENV) $(RIG)
