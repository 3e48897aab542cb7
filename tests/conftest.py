"""Shared test set-up: TensorFlow's C++ logs kept quiet.

The repository root is importable through pyproject.toml's ``pythonpath``; the test modules that
build TF 1 graphs call ``tf.disable_eager_execution()`` themselves or build inside a
``tf.Graph().as_default()`` block.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
