# Quick start: `make run` (rig on 127.0.0.1:8000) and `make test` (the whole suite).
VENV ?= .venv
RIG ?= .rig
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: bootstrap run rig test lint typecheck links pytest clean

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

pytest: bootstrap
	$(BIN)/python -m pytest

test: lint typecheck links pytest

clean:
	rm -rf $(VENV) $(RIG)
