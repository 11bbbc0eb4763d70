"""Draw the plots of the benchmarks' results from their JSON: ``python -m benchmarks.replot [FOLDER ...]``.

The PNGs are not kept in git: they are drawn from the ``results.json`` beside them, which is. Every ``results.json``
under the folders given (default: ``benchmarks/results``) gets its benchmark's plots next to it, by the code that
draws them at the end of a run:

- a biography sweep (a JSON with ``sweep``): ``benchmarks.biography.run.plot``;
- continual pre-training over a sequence of domains (runs with ``stages``):
  ``benchmarks.continual_pretraining.sequence.write_plots``;
- continual pre-training (runs with a ``curve``): ``benchmarks.continual_pretraining.report.write_plots``.

Only PNGs are written; ``results.json`` and ``results.md`` are left as they are. Needs matplotlib (``.[bench]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"


def plot_results(path: Path) -> Optional[str]:
    """Draw the plots of one ``results.json``; return the benchmark's name, or None for a JSON of another shape."""
    results = json.loads(path.read_text())
    folder = path.parent
    runs = results.get("runs")
    if "sweep" in results and "table" in results:
        from benchmarks.biography.run import plot

        plot(results, folder)
        return "biography"
    if isinstance(runs, dict) and runs and all("stages" in run for run in runs.values()):
        from benchmarks.continual_pretraining.sequence import write_plots

        write_plots(results, folder)
        return "continual_pretraining.sequence"
    if isinstance(runs, dict) and runs and all("curve" in run for run in runs.values()):
        from benchmarks.continual_pretraining.report import selected_runs, write_plots

        selected = selected_runs(results)
        if selected:  # as write_report: nothing to draw before a run has finished
            write_plots(selected, list(runs.values()), results["base"], folder)
        return "continual_pretraining"
    return None


def main(argv: Optional[list[str]] = None) -> dict[str, Optional[str]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replot", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="*", default=[RESULTS], help="default: benchmarks/results")
    args = parser.parse_args(argv)
    drawn = {}
    for folder in args.folders:
        for path in sorted(folder.rglob("results.json")):
            drawn[str(path)] = kind = plot_results(path)
            print(f"{path}: {kind or 'not a benchmark result this script knows, skipped'}", flush=True)
    return drawn


if __name__ == "__main__":
    main()
