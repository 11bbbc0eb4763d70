"""PNG plots shared by the evidence benchmarks: metric curves over training steps, and a forgetting-vs-learning
scatter (the stability-plasticity picture).

Both functions take plain dictionaries keyed by method name, so an experiment only has to collect its numbers.
matplotlib runs on the ``Agg`` backend (files only, no display), selected here before pyplot is imported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PathLike = Union[str, Path]


def plot_curves(
    curves: dict[str, dict[str, list[float]]], x_key: str, y_key: str, path: PathLike, title: str, ylabel: str
) -> None:
    """One line per method: ``curves[method][x_key]`` (e.g. training steps) against ``curves[method][y_key]``.

    Args:
        curves: method name -> a dictionary holding at least the two equally long lists ``x_key`` and ``y_key``.
        x_key, y_key: which lists to plot; ``x_key`` also labels the x axis.
        path: where the PNG is written (parent folders are created).
        title, ylabel: the figure's title and y-axis label.

    Raises:
        ValueError: no methods, a method without one of the keys, lists of different lengths, or an empty list.
    """
    if not curves:
        raise ValueError("plot_curves got no curves: pass {method: {x_key: [...], y_key: [...]}} with one method at least.")
    for method, curve in curves.items():
        missing = [key for key in (x_key, y_key) if key not in curve]
        if missing:
            raise ValueError(f"The curve of {method!r} has no {missing} list (it has {sorted(curve)}).")
        if len(curve[x_key]) != len(curve[y_key]):
            raise ValueError(
                f"The curve of {method!r} has {len(curve[x_key])} {x_key!r} values but {len(curve[y_key])} "
                f"{y_key!r} values: they must pair up."
            )
        if not curve[x_key]:
            raise ValueError(f"The curve of {method!r} is empty: record at least one point or leave the method out.")

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, curve in curves.items():
        axes.plot(curve[x_key], curve[y_key], marker="o", markersize=3, label=method)
    _finish(figure, axes, path, title, x_key, ylabel, legend=True)


def plot_tradeoff(points: dict[str, tuple[float, float]], path: PathLike, title: str, xlabel: str, ylabel: str) -> None:
    """A labelled scatter: one point per method at ``(forgetting, learning)``; down-left is "forgets little",
    and which direction is "learns much" depends on the learning measure, so the axis labels must say it.

    Args:
        points: method name -> ``(forgetting, learning)``, both finite.
        path: where the PNG is written (parent folders are created).
        title, xlabel, ylabel: the figure's title and axis labels.

    Raises:
        ValueError: no points, or a point that is not two finite numbers.
    """
    if not points:
        raise ValueError("plot_tradeoff got no points: pass {method: (forgetting, learning)} with one method at least.")
    for method, point in points.items():
        if len(point) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in point):
            raise ValueError(f"The point of {method!r} must be two finite numbers (forgetting, learning); got {point!r}.")

    figure, axes = _tradeoff_axes(figsize=(7, 5))
    for method, (forgetting, learning) in points.items():
        axes.scatter([forgetting], [learning], s=40)
        axes.annotate(method, (forgetting, learning), textcoords="offset points", xytext=(5, 4), fontsize="small")
    _finish(figure, axes, path, title, xlabel, ylabel, legend=False)


def plot_tradeoff_sweeps(
    sweeps: dict[str, list[tuple[float, float, str]]], path: PathLike, title: str, xlabel: str, ylabel: str
) -> None:
    """Like ``plot_tradeoff``, with several points per method joined by a line: ``sweeps[method]`` is a list of
    ``(forgetting, learning, label)``, e.g. one point per learning rate labelled with it, so each method draws its
    own forgetting-vs-learning curve and methods compare at equal learning rather than at one chosen setting.

    Raises:
        ValueError: no methods, a method without points, or a point whose first two entries are not finite numbers.
    """
    if not sweeps or not all(sweeps.values()):
        raise ValueError("plot_tradeoff_sweeps needs {method: [(forgetting, learning, label), ...]}, no method empty.")
    for method, points in sweeps.items():
        for point in points:
            if len(point) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in point[:2]):
                raise ValueError(f"A point of {method!r} must be (forgetting, learning, label) with finite numbers; got {point!r}.")

    figure, axes = _tradeoff_axes(figsize=(8, 5.5))
    for method, points in sweeps.items():
        xs, ys, labels = zip(*points)
        (line,) = axes.plot(xs, ys, marker="o", markersize=4, label=method)
        for x, y, label in points:
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize="x-small", color=line.get_color())
    _finish(figure, axes, path, title, xlabel, ylabel, legend=True)


def _tradeoff_axes(figsize):
    """A figure with the axes drawn through the origin: the base model (no forgetting, no learning), from which
    every method is measured."""
    figure, axes = plt.subplots(figsize=figsize)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.axvline(0, color="grey", linewidth=0.8)
    return figure, axes


def _finish(figure, axes, path: PathLike, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    """Label, grid and (optionally) legend, then write the PNG (parent folders created) and free the figure."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
