"""Settings for the whole test run."""

from __future__ import annotations

import os

import pytest

# Registrations in tests do not refine unless the test asks for it (refine=..., --refine, or by
# unsetting this). The product default refines automatically where the network's outline disagrees
# with a mask, which every untrained-model registration here does: each would add TensorFlow
# tracing and up to 10 s. Subprocesses inherit the setting. tests/test_refine.py and
# tests/test_pipeline_refine.py check the default itself.
os.environ["HIPATLAS_REFINE"] = "off"
# Likewise one network pass, not the shift ensemble's five (each pass costs an untrained model's
# forward pass, 1-2 s here); tests/test_ensemble.py asks for it.
os.environ["HIPATLAS_ENSEMBLE"] = "off"


@pytest.fixture(scope="module")
def left_case_and_model(tmp_path_factory):
    """A simulated left case (the JIA_MRI phantom) and an untrained compact model saved with its card."""
    import register_helpers as rh

    base = tmp_path_factory.getbasetemp()
    return rh.simulated_case(base, "left"), rh.saved_model(base)
