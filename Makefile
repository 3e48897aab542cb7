# `make test` and `make demo` build their own virtual environment from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: test test-other-kernels lint demo data-packages clean-venv

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

# TensorFlow's oneDNN kernels are on by default on CPUs with AVX512_VNNI, AVX512_BF16 or AMX (Intel
# Xeons, recent AMD EPYCs) and off on the others, and they behave differently (they fail on
# zero-sized batches). CI runs the tests of the model, the cascade and distribution once more with
# oneDNN switched the other way, so that neither CPU family can regress unseen.
KERNEL_TESTS := tests/resnet_model_test.py tests/cascade_export_test.py \
  tests/distributed_predict_test.py tests/cifar10_main_test.py tests/multi_worker_test.py \
  tests/recipe_test.py tests/tflite_cascade_test.py
test-other-kernels: $(STAMP) data-packages
	@other=$$($(PY) -c 'from tensorflow.python.util import _pywrap_util_port as p; \
	  print(0 if p.IsMklEnabled() else 1)' 2>/dev/null) && \
	echo "== kernel-sensitive tests again, with TF_ENABLE_ONEDNN_OPTS=$$other ==" && \
	TF_ENABLE_ONEDNN_OPTS=$$other $(PY) -m pytest -n 2 --dist loadfile $(KERNEL_TESTS)

demo: $(STAMP) data-packages
	$(PY) demo.py --output_dir demo_output

clean-venv:
	rm -rf $(VENV)
