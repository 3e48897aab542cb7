# `make test` and `make demo` build their own virtual environment from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: test lint demo clean-venv

$(STAMP): requirements.txt
	@$(PYTHON) --version >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 test'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects nothing: say so loudly instead of failing or passing quietly.
test: $(STAMP) lint
	@rc=0; $(PY) -m pytest -n 2 --dist loadfile tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "WARNING: pytest collected no tests (0 passed, 0 failed)"; rc=0; fi; \
	exit $$rc

demo: $(STAMP)
	$(PY) demo.py --output_dir demo_output

clean-venv:
	rm -rf $(VENV)
