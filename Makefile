# One-command entry points. Each creates .venv with the pinned dependencies when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPEC ?= specs/quickstart.yaml

.PHONY: run test test-slow install clean

$(BIN)/genspec: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/genspec

install: $(BIN)/genspec

run: $(BIN)/genspec
	$(BIN)/genspec run $(SPEC) --overwrite

test: $(BIN)/genspec
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/genspec
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info
