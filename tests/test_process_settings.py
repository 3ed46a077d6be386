"""Process-wide settings made when ``inference`` is imported (inference/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(inference.__file__)))


def _fresh(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != inference.BLAS_THREADS_ENV}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("2", "2")])
def test_numpy_gets_one_blas_thread_unless_the_user_chose(given, expected):
    env = {} if given is None else {inference.BLAS_THREADS_ENV: given}
    code = "import inference, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    assert _fresh(code, **env) == expected


def test_an_interpreter_that_imported_numpy_first_keeps_its_threads():
    code = "import numpy, inference, os; print(os.environ.get('OPENBLAS_NUM_THREADS', 'unset'))"
    assert _fresh(code) == "unset"
