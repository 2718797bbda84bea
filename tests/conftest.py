"""Shared test helpers: paths to the golden fixtures and the tiny AliTok generator."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures
    ("one_thread")`): tiny matmuls are far faster without 2-core hand-offs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_alitok():
    """The golden tiny AliTok AR model (hidden 64, 2 layers, V=64), eval mode."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from alitok.model import ARModel
    model = ARModel(OmegaConf.load(FIXTURES / "alitok_ar_tiny_config.yaml")).eval()
    model.load_state_dict(load_file(FIXTURES / "alitok_ar_tiny_weights.safetensors"), strict=True)
    return model


def load_golden(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(FIXTURES / name)


# Fixtures that run a whole job (the sampler or evaluator as a script, the table scripts, the
# demo): every test that uses one is end to end, whether or not it is the first to pay for it.
END_TO_END_FIXTURES = {"single_run", "script_run", "smoke_results", "quick_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
