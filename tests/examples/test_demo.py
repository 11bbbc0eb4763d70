"""The README's main job: the continual pre-training demo, in its quick configuration (about a minute)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_prints_one_row_per_model_and_the_disabled_adapter_is_the_base_model():
    done = subprocess.run(
        [sys.executable, "examples/continual_pretraining_demo.py", "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header - 1].split() == ["learning", "forgetting", "genre", "learned", "routed"]
    assert lines[header].split()[1:] == [
        "Spanish", "ppl", "English", "drift", "answer", "ppl", "English", "ppl", "to", "expansion"
    ]  # fmt: skip
    base, scale, routed = (lines[header + i].split() for i in (2, 3, 4))
    assert base[:2] == ["base", "model"] and base[3] == "0.0000" and base[-1] == "-"  # its drift from itself: 0
    assert scale[0] == "SCALE-FFN" and float(scale[3]) > 0 and scale[-1] == "-"  # training moved the predictions
    assert " ".join(routed[:4]) == "SCALE-FFN + learned router" and routed[-2] == "/"  # "en% / es%" to the expansion
    assert "SCALE router of adapter 'default' (reads the input of layer 10; old side: base model samples" in out
    for label in ("SCALE-FFN", "SCALE-FFN + learned router"):
        assert f"{label}, adapter disabled: English ppl" in out
    assert out.count("relative gap 0.0e+00), drift 0.0e+00: base model preserved") == 2
    # A clean screen: the progress bars of loading and training only, no warnings, no datasets "Map" bars.
    assert "Warning" not in done.stderr and "Map" not in done.stderr, done.stderr[-3000:]
