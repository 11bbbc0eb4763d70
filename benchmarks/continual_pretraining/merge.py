"""Merge the results of continual pre-training runs made in parallel, one process per group of methods.

On a GPU, one 135M-parameter run leaves the device mostly idle (a step's time is the Python and kernel-launch cost
of its operations, not its arithmetic), so the sweep runs fastest as several processes, each with its own
``--methods`` and ``--output-dir``::

    python -m benchmarks.continual_pretraining.run --device cuda --methods full full_replay --output-dir out/g1 &
    python -m benchmarks.continual_pretraining.run --device cuda --methods lora freeze --output-dir out/g2 &
    ...; wait
    python -m benchmarks.continual_pretraining.merge out/all out/g1 out/g2 ...

The parts must have been made with the same settings (``results.json``'s ``settings``); their runs and commands are
joined and the report (``results.md``, plots) is written for the whole. Everything else (the base model's numbers
and answers, the machine) is the first part's; a field only a later part has (e.g. ``base_samples``, the base
model's samples that its runs used) is taken from the first part that has it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.continual_pretraining import report


def merge_results(parts: list[dict]) -> dict:
    """One results dict holding every part's runs; the parts' settings must agree."""
    if not parts:
        raise ValueError("Nothing to merge: give at least one folder with a results.json.")
    merged = json.loads(json.dumps(parts[0]))  # a deep copy
    for part in parts[1:]:
        if part["settings"] != merged["settings"]:
            raise ValueError(
                "These results were made with other settings and cannot be compared in one table:\n"
                f"  {part['settings']}\nvs\n  {merged['settings']}"
            )
        merged["runs"].update(part["runs"])
        for key, value in part.items():
            merged.setdefault(key, json.loads(json.dumps(value)))
        for command in part.get("commands", []):
            if command not in merged.setdefault("commands", []):
                merged["commands"].append(command)
    return merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="where the merged results.json, results.md and plots go")
    parser.add_argument("parts", type=Path, nargs="+", help="output folders of the parallel runs")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.parts if not (p / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {', '.join(missing)}")
    merged = merge_results([json.loads((p / "results.json").read_text()) for p in args.parts])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(merged, indent=1, allow_nan=True))
    report.write_report(merged, args.output_dir)
    print(f"merged {len(merged['runs'])} runs into {args.output_dir}")
    return merged


if __name__ == "__main__":
    main()
