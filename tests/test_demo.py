"""The README's main job: the continual pre-training demo, in its quick configuration (about a minute)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_and_the_disabled_adapter_is_the_base_model():
    done = subprocess.run(
        [sys.executable, "examples/continual_pretraining_demo.py", "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "English   forgetting" in out and "Spanish   learning" in out
    assert "relative gap 0.0e+00): base model preserved" in out
