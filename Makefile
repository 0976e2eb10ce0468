# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv by themselves: torch 2.13.0 (CPU wheel) first, then the package constrained to it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scail2-installed
PYTEST_ARGS ?=

.PHONY: setup browser test test-fast demo bench clean

setup: $(STAMP) browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m scail2.utils.envcheck
	touch $(STAMP)

# Headless Chromium for the browser tests (tests/bench/test_study_browser.py), driven by Playwright (the [dev]
# extra) through Debian's package: Playwright's own browser download cannot work offline. Installed when missing
# and run as root; elsewhere the browser tests are skipped and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
			|| echo "note: installing chromium failed: the browser tests will be skipped"; \
	else \
		echo "note: chromium is missing and cannot be installed here (needs root and apt-get): browser tests skip"; \
	fi

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/scail2-train experiment=demo

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_backbone.py

clean:
	rm -rf $(VENV) outputs .pytest_cache test-artifacts
