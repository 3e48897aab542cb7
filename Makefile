# `make test` and `make demo` build their own virtual environment from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: test lint demo data-packages clean-venv

$(STAMP): requirements.txt
	@$(PYTHON) --version >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 test'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Fashion-MNIST (real images for the demo and the tests) comes from a Debian package.
data-packages:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; tests that need it are skipped"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects nothing: say so loudly instead of failing or passing quietly.
test: $(STAMP) data-packages lint
	@rc=0; $(PY) -m pytest -n 2 --dist loadfile tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "WARNING: pytest collected no tests (0 passed, 0 failed)"; rc=0; fi; \
	exit $$rc

demo: $(STAMP) data-packages
	$(PY) demo.py --output_dir demo_output

clean-venv:
	rm -rf $(VENV)
