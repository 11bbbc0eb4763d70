"""benchmarks/plotting.py writes real PNG files and rejects empty or malformed input with a clear error."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from benchmarks.plotting import plot_curves, plot_tradeoff, plot_tradeoff_sweeps  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_curves_writes_a_png(tmp_path):
    curves = {"full": {"step": [0, 10, 20], "ppl": [30.0, 25.0, 22.0]}, "scale_route": {"step": [0, 10], "ppl": [30.0, 28.0]}}
    path = tmp_path / "sub" / "curves.png"
    plot_curves(curves, "step", "ppl", path, title="Spanish perplexity", ylabel="perplexity")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_tradeoff_writes_a_png(tmp_path):
    path = tmp_path / "tradeoff.png"
    plot_tradeoff({"full": (0.2, 10.0), "lora": (0.05, 6.0)}, path, title="t", xlabel="drift", ylabel="drop")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "curves, message",
    [
        ({}, "no curves"),
        ({"full": {"step": [0, 1]}}, "no \\['ppl'\\]"),
        ({"full": {"step": [0, 1], "ppl": [1.0]}}, "pair up"),
        ({"full": {"step": [], "ppl": []}}, "empty"),
    ],
)
def test_plot_curves_rejects_bad_input(tmp_path, curves, message):
    with pytest.raises(ValueError, match=message):
        plot_curves(curves, "step", "ppl", tmp_path / "x.png", title="t", ylabel="y")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("points, message", [({}, "no points"), ({"full": (1.0, float("nan"))}, "two finite")])
def test_plot_tradeoff_rejects_bad_input(tmp_path, points, message):
    with pytest.raises(ValueError, match=message):
        plot_tradeoff(points, tmp_path / "x.png", title="t", xlabel="x", ylabel="y")
    assert not (tmp_path / "x.png").exists()


def test_plot_tradeoff_sweeps_writes_a_png(tmp_path):
    sweeps = {"full": [(0.01, 20.0, "1e-5"), (0.04, 36.0, "3e-5")], "scale_ffn": [(0.15, 42.0, "1e-3")]}
    path = tmp_path / "sweeps.png"
    plot_tradeoff_sweeps(sweeps, path, title="t", xlabel="drift", ylabel="drop")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("sweeps", [{}, {"full": []}, {"full": [(0.1, float("inf"), "1e-5")]}, {"full": [(0.1, 2.0)]}])
def test_plot_tradeoff_sweeps_rejects_bad_input(tmp_path, sweeps):
    with pytest.raises(ValueError, match="forgetting, learning, label"):
        plot_tradeoff_sweeps(sweeps, tmp_path / "x.png", title="t", xlabel="x", ylabel="y")
    assert not (tmp_path / "x.png").exists()


# -------------------------------------------------------------------------- benchmarks/replot.py


@pytest.mark.parametrize(
    ("folder", "kind"),
    [
        ("biography/learned_router_smoothed", "biography"),
        ("continual_pretraining/h100_60_steps", "continual_pretraining"),
        ("continual_pretraining/sequence_cpu_40_steps", "continual_pretraining.sequence"),
    ],
)
def test_replot_draws_the_plots_a_results_json_names(tmp_path, folder, kind):
    """The PNGs are not in git: each benchmark's plots are drawn again from its committed results.json."""
    import json

    from benchmarks.continual_pretraining import report, sequence
    from benchmarks.replot import RESULTS, main

    (tmp_path / "results.json").write_bytes((RESULTS / folder / "results.json").read_bytes())
    assert main([str(tmp_path)]) == {str(tmp_path / "results.json"): kind}
    named = {
        "biography": lambda: json.loads((tmp_path / "results.json").read_text())["plots"],
        "continual_pretraining": report.plot_files,
        "continual_pretraining.sequence": sequence.plot_files,
    }[kind]()
    assert sorted(path.name for path in tmp_path.glob("*.png")) == sorted(named)
    assert all(path.read_bytes()[:8] == PNG_SIGNATURE for path in tmp_path.glob("*.png"))


def test_replot_skips_a_json_of_another_shape(tmp_path):
    from benchmarks.replot import main

    (tmp_path / "results.json").write_text('{"rows": []}')
    assert main([str(tmp_path)]) == {str(tmp_path / "results.json"): None}
    assert not list(tmp_path.glob("*.png"))
