# Quick start: `make demo` (live metrics from the embedded simulator) and `make test`.
# Each target sets up what it needs: a virtualenv in .venv, and for tests the Debian
# packages that provide promtool, prometheus and alertmanager.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := prometheus prometheus-alertmanager

.PHONY: demo test lint tools clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is required (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/catalog-upload-exporter --demo

tools:
	@command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); }

test: $(VENV)/.installed-test tools
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict exporter

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
