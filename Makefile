# Quick start: `make demo` (live metrics from the embedded simulator) and `make test`.
# Each target sets up what it needs: a virtualenv in .venv, and for tests the Debian
# packages that provide promtool, prometheus and alertmanager, podman (with runc) and
# mmdebstrap, which build and run the image (tests/test_container.py), and Node.js with npm,
# which install and run the Prometheus Operator's schemas (tests/test_operator_objects.py).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# command:package pairs; `make tools` installs the package of each command that is missing.
APT_TOOLS := promtool:prometheus prometheus-alertmanager:prometheus-alertmanager \
	podman:podman runc:runc mmdebstrap:mmdebstrap node:nodejs npm:npm
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= catalog-upload-exporter:$(VERSION)
CONTAINER_ENGINE ?= $(shell command -v podman || command -v docker)
# With WHEELS=DIR (wheels of every dependency and of setuptools), the build needs no network;
# PYTHON_IMAGE=... replaces the pinned base (a mirror, or any image with python3, venv and pip).
WHEELS ?=
PYTHON_IMAGE ?=

# The one place that says where the alerts' runbooks live: every runbook_url is this base, "#",
# and the alert's anchor (docs/alerts.md, "Runbook links"). Change it here, or pass it, and run
# `make rules`, which rewrites the rules file and the PrometheusRule generated from it.
RUNBOOK_BASE ?= https://github.com/catalog-upload-exporter/catalog-upload-exporter/blob/main/docs/alerts.md
# The alerts' job matcher, the other place: a regular expression (Prometheus', anchored) of the
# job label(s) the exporter is scraped under. Every `job=~"..."` in the rules is this; change it
# together with your scrape config or monitor, and run `make rules` (docs/alerts.md). The
# shipped PodMonitor, ServiceMonitor and scrape config all give the job catalog-upload-exporter.
EXPORTER_JOB ?= catalog-upload-exporter
RULES_FILE ?= deploy/prometheus/catalog-upload-exporter.rules.yml
PROMETHEUS_RULE ?= deploy/kubernetes/prometheusrule.yaml

.PHONY: demo test test-fast lint lock tools image rules clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is required (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The locked builds (DEVELOPERS.md, "The lock"): every dependency comes from requirements/, pinned
# with its hashes (--require-hashes), then the project itself, which has no hash, without its
# dependencies and built with the locked setuptools (no build isolation, which would fetch an
# unpinned one). test.txt pins pip too, which replaces the venv's own.
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements/runtime.txt requirements/build.txt
	$(PIP_LOCKED) -r requirements/runtime.txt -r requirements/build.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.txt
	$(PIP_LOCKED) -r requirements/test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/catalog-upload-exporter --demo

tools:
	@missing=$$(for pair in $(APT_TOOLS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; \
	done); \
	[ -z "$$missing" ] || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; }

# The image (docs/deploying.md): needs the base's registry, and PyPI unless WHEELS is set.
image:
	@[ -n "$(CONTAINER_ENGINE)" ] || { echo "podman or docker is required"; exit 1; }
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(VERSION) \
		$(if $(WHEELS),--network none --build-context wheels=$(abspath $(WHEELS))) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
		-t $(IMAGE) .

# Tests run in parallel (pytest-xdist): two workers per core, as most tests spend their time
# waiting on timers, sockets and child processes (at one per core the cores are half idle).
# `loadgroup` keeps the container tests, which share one image build, on one worker.
# PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= $(shell echo $$((2 * $$(nproc 2>/dev/null || echo 1))))
PYTEST := $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

# tests/test_operator_objects.py validates the Prometheus Operator objects with the operator's
# schemas from npm (tests/operator-schemas: package.json and its lock), installed here.
NPM_DIR := .cache/npm
$(NPM_DIR)/.installed: tests/operator-schemas/package.json tests/operator-schemas/package-lock.json
	mkdir -p $(NPM_DIR)
	cp tests/operator-schemas/package.json tests/operator-schemas/package-lock.json $(NPM_DIR)/
	cd $(NPM_DIR) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

test: $(VENV)/.installed-test tools $(NPM_DIR)/.installed
	$(PYTEST)

# The inner loop: everything but the tests marked slow (real Prometheus, podman, the CLI's
# demo, promtool's rule tests) or soak; a minute or less on 2 cores.
test-fast: $(VENV)/.installed-test tools $(NPM_DIR)/.installed
	$(PYTEST) -m "not slow and not soak"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict exporter

# Rewrites the lock files from pyproject.toml (its dependencies, its test extra, its build backend)
# and requirements/dev.in, keeping every pin that still fits; UPGRADE=1 moves every pin to the
# newest release that fits. test.txt is resolved first; the image's runtime.txt and build.txt
# are held to its versions (-c), so the image runs what the tests ran. One resolution for every
# platform (--universal), hashes of every file of each release.
UV_COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
BUILD_REQUIRES := $(BIN)/python -c 'import tomllib; \
	print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

lock: $(VENV)/.installed-test
	$(BUILD_REQUIRES) | $(UV_COMPILE) pyproject.toml --extra test requirements/dev.in - \
		-o requirements/test.txt
	$(UV_COMPILE) pyproject.toml -c requirements/test.txt -o requirements/runtime.txt
	$(BUILD_REQUIRES) | $(UV_COMPILE) - -c requirements/test.txt -o requirements/build.txt

# The rules file with RUNBOOK_BASE in every runbook_url, then the PrometheusRule: its header
# (everything up to `spec:`) and the rules file's groups, indented under it.
rules:
	@case '$(RUNBOOK_BASE)' in *[\|\&\#\"\ ]*|'') \
		echo "RUNBOOK_BASE must be a URL without | & # \" or spaces"; exit 1;; esac
	@case '$(EXPORTER_JOB)' in *[%\&\\\"\ ]*|'') \
		echo "EXPORTER_JOB must be a regular expression without % & \\ \" or spaces"; exit 1;; esac
	sed -E -e 's|^( *runbook_url: )"[^"#]*#|\1"$(RUNBOOK_BASE)#|' \
		-e 's%job=~"[^"]*"%job=~"$(EXPORTER_JOB)"%g' $(RULES_FILE) > $(RULES_FILE).tmp
	mv $(RULES_FILE).tmp $(RULES_FILE)
	{ sed '/^spec:$$/q' $(PROMETHEUS_RULE); sed -e '/^#/d' -e 's/^./  &/' $(RULES_FILE); } \
		> $(PROMETHEUS_RULE).tmp
	mv $(PROMETHEUS_RULE).tmp $(PROMETHEUS_RULE)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache
