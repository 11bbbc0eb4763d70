"""What the biography diagnostics share: their command line (run.py's ``--cache-dir``, ``--quick``, ``--output-dir``)
and the stage-2 model they diagnose (``run.pretrain_or_load``: loaded from the cache, or stages 1-2 run and cached)."""

import argparse
from pathlib import Path

import torch

from benchmarks.biography.run import Experiment, Settings, pretrain_or_load


def parse_args(doc: str, results: Path, argv=None) -> argparse.Namespace:
    """``CACHE_DIR`` (optional), ``--quick`` and ``--output-dir`` (default ``results``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("cache_dir", nargs="?", default=None, help="run.py's --cache-dir (the stage-2 model)")
    parser.add_argument("--quick", action="store_true", help="smoke test: Settings.quick()")
    parser.add_argument("--output-dir", type=Path, default=results, help="where the JSON goes (default: %(default)s)")
    return parser.parse_args(argv)


def stage2(quick: bool, cache_dir) -> tuple:
    """``(settings, experiment, base model in eval mode, stages 1-2 report)`` of the full (or quick) settings, on one
    CPU thread."""
    torch.set_num_threads(1)
    settings = Settings.quick() if quick else Settings.full()
    experiment = Experiment(settings, torch.device("cpu"), "fp32")
    base, stages = pretrain_or_load(experiment, cache_dir, print)
    return settings, experiment, base.eval(), stages
