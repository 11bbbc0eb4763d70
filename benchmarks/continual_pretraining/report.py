"""results.json -> results.md (tables, the bar, the commands) and PNG plots (``benchmarks/plotting.py``).

Which learning rate represents a method: the one with the lowest final new-language perplexity, i.e. what a user
tuning for the new language would pick. Every run is listed in the second table, so the choice can be checked.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.methods import ROUTED_METHODS
from benchmarks.plotting import plot_curves, plot_tradeoff, plot_tradeoff_sweeps
from peft_scale.router_fitting import FIRST_TOKENS

# The bar of the issue, for SCALE against full fine-tuning at their selected learning rates.
BAR_DRIFT_RATIO = 0.10  # SCALE's drift <= 10% of full fine-tuning's
BAR_ANSWER_RISE = 0.02  # SCALE's chat-answer perplexity rises <= 2%
BAR_LEARNING_RATIO = 0.80  # SCALE's new-language perplexity drop >= 80% of full fine-tuning's
# The goals of the learned router's issue, for every learned-route run: learning against the best full fine-tuning
# run (the lowest final new-language perplexity among the `full` runs), drift and chat answers against the base model.
GOAL_LEARNING_RATIO = 0.90  # new-language perplexity drop >= 90% of the best full fine-tuning's
GOAL_DRIFT = {"old data": 0.01, "base model samples": 0.02}  # drift (nats/token) by the router's old side
GOAL_ANSWER_RISE = 0.01  # chat-answer perplexity rises <= 1%

CURVES = {
    "new_perplexity": "new-language (learning) perplexity",
    "drift": "drift (b): KL(base || adapted), nats/token",
    "old_perplexity": "old-language perplexity (a)",
    "answer_perplexity": "perplexity of the base model's chat answers (c)",
}


def change(value: float, base: float) -> float:
    """Relative change, ``value / base - 1``."""
    return value / base - 1


def selected_runs(results: dict) -> dict[str, dict]:
    """Run name -> its record at the learning rate with the lowest final new-language perplexity."""
    best: dict[str, dict] = {}
    for record in results["runs"].values():
        learning = record["final"]["new_perplexity"]
        if not math.isfinite(learning):
            continue
        current = best.get(record["run"])
        if current is None or learning < current["final"]["new_perplexity"]:
            best[record["run"]] = record
    return best


def _row(record: dict, base: dict) -> str:
    final = record["final"]
    routed = final.get("old_routed_to_preservation")
    cells = [
        f"`{record['run']}`",
        f"{record['lr']:g}",
        f"{record['trainable_parameters'] / 1e6:.2f}M",
        f"{final['new_perplexity']:.2f} ({change(final['new_perplexity'], base['new_perplexity']):+.1%})",
        f"{final['old_perplexity']:.2f} ({change(final['old_perplexity'], base['old_perplexity']):+.1%})",
        f"{final['drift']:.3g}",
        f"{final['answer_perplexity']:.3f} ({change(final['answer_perplexity'], base['answer_perplexity']):+.1%})",
        "-" if routed is None else f"{routed:.0%} / {final['new_routed_to_preservation']:.0%}",
        f"{record['seconds']['step_median']:.3f}",
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = (
    "| method | lr | trainable | new-language ppl (learning) | (a) old-language ppl | (b) drift, nats/token "
    "| (c) chat-answer ppl | routed to base (old / new text) | s/step |\n|---|---|---|---|---|---|---|---|---|"
)


def bar_lines(selected: dict[str, dict], runs: list[dict], base: dict) -> list[str]:
    """Every SCALE run (each learning rate) against full fine-tuning at its selected learning rate, on the issue's
    three criteria."""
    if "full" not in selected:
        return ["(no `full` run: the bar compares with full fine-tuning)"]
    full = selected["full"]["final"]
    full_drop = base["new_perplexity"] - full["new_perplexity"]
    lines = [
        f"Full fine-tuning at lr {selected['full']['lr']:g}: drift {full['drift']:.3g}, new-language perplexity drop "
        f"{full_drop:.2f}.",
        "",
        f"| run | lr | drift / full's (bar <= {BAR_DRIFT_RATIO:.0%}) | chat-answer ppl rise (bar <= {BAR_ANSWER_RISE:.0%}) "
        f"| new-language ppl drop / full's (bar >= {BAR_LEARNING_RATIO:.0%}) | meets all |",
        "|---|---|---|---|---|---|",
    ]
    for record in sorted(runs, key=lambda r: (r["run"], r["lr"])):
        if not record["run"].startswith("scale"):
            continue
        final = record["final"]
        drift_ratio = final["drift"] / full["drift"] if full["drift"] > 0 else float("inf")
        rise = change(final["answer_perplexity"], base["answer_perplexity"])
        learning_ratio = (base["new_perplexity"] - final["new_perplexity"]) / full_drop if full_drop > 0 else float("nan")
        meets = drift_ratio <= BAR_DRIFT_RATIO and rise <= BAR_ANSWER_RISE and learning_ratio >= BAR_LEARNING_RATIO
        lines.append(
            f"| `{record['run']}` | {record['lr']:g} | {drift_ratio:.1%} | {rise:+.1%} | {learning_ratio:.0%} "
            f"| {'yes' if meets else 'no'} |"
        )
    return lines


def is_routed(record: dict) -> bool:
    """A learned-route run (its router fitted before training)."""
    return record["method"] in ROUTED_METHODS


def _share(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _drift(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def routed_goal_lines(selected: dict[str, dict], runs: list[dict], base: dict) -> list[str]:
    """Every learned-route run against the issue's goals (``GOAL_*``), with its router's held-out accuracy; then
    where its drift, learning and chat answers come from (the routing decisions on the evaluation text)."""
    routed = sorted((r for r in runs if is_routed(r)), key=lambda r: (r["run"], r["lr"]))
    if not routed:
        return []
    lines = ["## The learned router against its goals", ""]
    if "full" not in selected:
        return lines + ["(no `full` run: the learning goal compares with the best full fine-tuning run)", ""]
    full = selected["full"]
    full_drop = base["new_perplexity"] - full["final"]["new_perplexity"]
    drift_goals = " / ".join(f"<= {goal:g} with {side}" for side, goal in GOAL_DRIFT.items())
    lines += [
        f"Goals: new-language perplexity drop >= {GOAL_LEARNING_RATIO:.0%} of the best full fine-tuning's (lr "
        f"{full['lr']:g}: {base['new_perplexity']:.2f} -> {full['final']['new_perplexity']:.2f}, a drop of "
        f"{full_drop:.2f}); drift {drift_goals} as the router's old side; chat-answer perplexity rise <= "
        f"{GOAL_ANSWER_RISE:+.0%}. Router: `fit_router`'s held-out report (tokens of sequences it neither fitted nor "
        f"calibrated on; in parentheses the first {FIRST_TOKENS} tokens of each sequence).",
        "",
        "| run | lr | router's old side | router held-out: old -> base / new -> expansion | learning: drop / best "
        "full's | drift | chat-answer ppl rise | meets all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in routed:
        final, router = record["final"], record.get("router", {})
        report = router.get("report", {})
        side = router.get("old_side", "?")
        drop = base["new_perplexity"] - final["new_perplexity"]
        ratio = drop / full_drop if full_drop > 0 else float("nan")
        rise = change(final["answer_perplexity"], base["answer_perplexity"])
        drift_goal = GOAL_DRIFT.get(side, min(GOAL_DRIFT.values()))
        goals = (ratio >= GOAL_LEARNING_RATIO, final["drift"] <= drift_goal, rise <= GOAL_ANSWER_RISE)
        mark = ["meets" if met else "misses" for met in goals]
        accuracy = (
            f"{report['old_to_base']:.1%} / {report['new_to_expansion']:.1%} "
            f"({report['first_tokens_old_to_base']:.1%} / {report['first_tokens_new_to_expansion']:.1%})"
            if report else "-"
        )
        lines.append(
            f"| `{record['run']}` | {record['lr']:g} | {side} | {accuracy} | {ratio:.0%} ({mark[0]}) "
            f"| {final['drift']:.3g} ({mark[1]} <= {drift_goal:g}) | {rise:+.1%} ({mark[2]}) "
            f"| {'yes' if all(goals) else 'no'} |"
        )
    lines += [
        "",
        "Where the numbers come from, on the evaluation text (the trained model in eval mode, routing as it does in "
        f"training): the share of old-language tokens sent to the expansion (all, first {FIRST_TOKENS} of each "
        "block); the drift on the old-language tokens routed to the base model and on those routed to the expansion "
        "(the drift is their token-weighted mean); the share of new-language tokens routed to the base model (they "
        "learn nothing); the share of the chat-answer tokens' predictions routed to the base model. Router fit and "
        "training times in seconds.",
        "",
        f"| run | lr | old tokens -> expansion (first {FIRST_TOKENS}) | drift on old -> base / old -> expansion "
        "| new tokens -> base | answer tokens -> base | router fit s | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in routed:
        final, seconds = record["final"], record["seconds"]
        old_kept, first_kept = final.get("old_routed_to_preservation"), final.get("old_routed_to_preservation_first_tokens")
        answer_kept = final.get("answer_routed_to_preservation")
        lines.append(
            f"| `{record['run']}` | {record['lr']:g} "
            f"| {_share(None if old_kept is None else 1 - old_kept)} ({_share(None if first_kept is None else 1 - first_kept)}) "
            f"| {_drift(final.get('drift_on_preservation'))} / {_drift(final.get('drift_on_adaptation'))} "
            f"| {_share(final.get('new_routed_to_preservation'))} | {_share(answer_kept)} "
            f"| {seconds.get('router_fit', float('nan')):.0f} | {seconds['train']:.0f} |"
        )
    return lines + [""]


def route_lines(results: dict, base: dict) -> list[str]:
    """SCALE-Route's two heads at the last step, and what other routing thresholds would have given (evaluation
    only, from the same logits): where the learning and the forgetting of a route run come from."""
    records = [r for r in results["runs"].values() if r.get("route_threshold_sweep")]
    if not records:
        return []
    lines = [
        "## SCALE-Route: the two heads, and the routing threshold",
        "",
        "The adaptation head alone (no routing) against the routed output; then, for other thresholds tau (a token takes "
        "the base model's logits where cos(z_pres, z_adapt) >= tau), the routed output's new-language perplexity, drift "
        "and share of tokens routed to the base model (old / new text). Evaluation only: the same trained model.",
        "",
        "| run | adaptation head: new ppl, drift, chat-answer ppl | routed (tau 0.5): new ppl, drift | "
        + " | ".join(f"tau {tau}" for tau in results_thresholds(records)) + " |",
        "|---|---|---|" + "---|" * len(results_thresholds(records)),
    ]
    for record in records:
        final, sweep = record["final"], record["route_threshold_sweep"]
        cells = [
            f"`{record['run']}` lr {record['lr']:g}",
            f"{final['new_perplexity_adaptation_head']:.2f}, {final['drift_adaptation_head']:.3g}, "
            + (f"{final['answer_perplexity_adaptation_head']:.3f}" if "answer_perplexity_adaptation_head" in final else "-"),
            f"{final['new_perplexity']:.2f}, {final['drift']:.3g}",
        ]
        for tau in results_thresholds(records):
            new, old = sweep["new"][tau], sweep["old"][tau]
            cells.append(
                f"{new['perplexity']:.2f}, {old['drift']:.3g} "
                f"({old['routed_to_preservation']:.0%} / {new['routed_to_preservation']:.0%})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def results_thresholds(records: list[dict]) -> list[str]:
    return list(records[0]["route_threshold_sweep"]["new"])  # JSON keys: the thresholds as strings


def switch_lines(runs: list[dict]) -> list[str]:
    """The runs measured on text that switches language (``measures.switch_measures``; runs recorded before that
    measure existed have none): the drift on the old-language half after a new-language half, and where a learned
    router sent those tokens."""
    measured = [record for record in runs if "switch_drift" in record["final"]]
    if not measured:
        return []
    lines = [
        "## Text that switches language",
        "",
        "Each evaluation row: the first half of a new-language block, then the second half of an old-language one. "
        "Drift (b) on the old-language half only; for a learned router, the share of those tokens computed as the "
        f"base model (in parentheses: the first {FIRST_TOKENS} after the switch). The drift on single-language "
        "old text is the table's (b).",
        "",
        f"| run | lr | drift after the switch | (b) drift | old tokens after the switch -> base (first {FIRST_TOKENS}) "
        "| drift there on base / expansion tokens |",
        "|---|---|---|---|---|---|",
    ]
    for record in measured:
        final = record["final"]
        kept = final.get("switch_routed_to_preservation")
        routed = split = "-"
        if kept is not None:
            routed = f"{kept:.1%} ({final['switch_routed_to_preservation_first_tokens']:.1%})"
            split = " / ".join(
                "-" if value is None else f"{value:.4f}"
                for value in (final["switch_drift_on_preservation"], final["switch_drift_on_adaptation"])
            )
        lines.append(
            f"| `{record['run']}` | {record['lr']:g} | {final['switch_drift']:.4f} | {final['drift']:.4f} | {routed} "
            f"| {split} |"
        )
    return lines + [""]


def write_report(results: dict, output_dir: Path) -> None:
    """results.md and the PNGs from ``results`` (as written to results.json)."""
    output_dir = Path(output_dir)
    base, settings = results["base"], results["settings"]
    selected = selected_runs(results)
    lines = [
        "# Continual pre-training: forgetting against learning",
        "",
        f"Machine: {results['machine']}. Settings: `{settings}`. The new-language text was cycled "
        f"{results['text_epochs']:.2f} times (below 1: one pass over part of it).",
        "",
        "Base model: " + ", ".join(f"{k} {v:.4g}" for k, v in base.items()) + ".",
        "",
        "Learning: new-language perplexity (lower is better). Forgetting: (a) old-language perplexity, (b) drift, the "
        "mean KL(base || adapted) over the held-out old-language tokens, (c) the adapted model's perplexity of the "
        "base model's greedy answers to fixed English chat prompts. Changes in parentheses are against the base model.",
        "",
        "## Each method at its best learning rate (lowest final new-language perplexity)",
        "",
        TABLE_HEAD,
        *(_row(record, base) for record in selected.values()),
        "",
        "## Against the bar (every SCALE run vs full fine-tuning at its selected learning rate)",
        "",
        *bar_lines(selected, list(results["runs"].values()), base),
        "",
        *routed_goal_lines(selected, list(results["runs"].values()), base),
        *route_lines(results, base),
        *switch_lines(list(results["runs"].values())),
        "## Every run",
        "",
        TABLE_HEAD,
        *(_row(record, base) for record in results["runs"].values()),
        "",
        "## Commands",
        "",
        *(f"    {command}" for command in results.get("commands", [])),
        "",
        "Plots: " + ", ".join(f"`{name}`" for name in plot_files()),
        "",
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text("\n".join(lines))
    if selected:
        write_plots(selected, list(results["runs"].values()), base, output_dir)


def plot_files() -> list[str]:
    measures = ("drift", "old_perplexity", "answer_perplexity")
    return (
        [f"curves_{key}.png" for key in CURVES]
        + [f"tradeoff_{key}.png" for key in measures]
        + [f"sweep_tradeoff_{key}.png" for key in measures]
    )


def write_plots(selected: dict[str, dict], runs: list[dict], base: dict, output_dir: Path) -> None:
    """Curves of the selected runs; forgetting-vs-learning scatters of the selected runs (``tradeoff_*``) and of
    every run, one line per method through its learning rates (``sweep_tradeoff_*``)."""
    labels = {name: f"{name} (lr {record['lr']:g})" for name, record in selected.items()}
    for key, ylabel in CURVES.items():
        curves = {labels[name]: record["curve"] for name, record in selected.items()}
        plot_curves(curves, "step", key, output_dir / f"curves_{key}.png", title=f"{ylabel} over training", ylabel=ylabel)

    def learning_of(record: dict) -> float:
        return -change(record["final"]["new_perplexity"], base["new_perplexity"]) * 100

    learning = {name: learning_of(r) for name, r in selected.items()}
    ylabel = "learning: new-language perplexity drop, % (higher is better)"
    forgetting = {
        "drift": ("forgetting (b): drift, KL(base || adapted) nats/token", lambda f: f["drift"]),
        "old_perplexity": (
            "forgetting (a): old-language perplexity change, %",
            lambda f: change(f["old_perplexity"], base["old_perplexity"]) * 100,
        ),
        "answer_perplexity": (
            "forgetting (c): chat-answer perplexity change, %",
            lambda f: change(f["answer_perplexity"], base["answer_perplexity"]) * 100,
        ),
    }
    sweeps: dict[str, list[dict]] = {}
    for record in sorted(runs, key=lambda r: r["lr"]):
        sweeps.setdefault(record["run"], []).append(record)
    for key, (xlabel, measure) in forgetting.items():
        points = {labels[name]: (measure(r["final"]), learning[name]) for name, r in selected.items()}
        plot_tradeoff(points, output_dir / f"tradeoff_{key}.png", title="forgetting vs learning", xlabel=xlabel, ylabel=ylabel)
        curves = {
            name: [(measure(r["final"]), learning_of(r), f"{r['lr']:g}") for r in records if _finite(r)]
            for name, records in sweeps.items()
        }
        curves = {name: points for name, points in curves.items() if points}
        if curves:
            plot_tradeoff_sweeps(
                curves, output_dir / f"sweep_tradeoff_{key}.png", title="forgetting vs learning, every learning rate",
                xlabel=xlabel, ylabel=ylabel,
            )  # fmt: skip


def _finite(record: dict) -> bool:
    final = record["final"]
    return all(math.isfinite(final[key]) for key in ("new_perplexity", "old_perplexity", "drift", "answer_perplexity"))


def main(argv=None) -> None:
    """``python -m benchmarks.continual_pretraining.report DIR``: rewrite DIR's results.md and PNGs from its
    results.json (after editing the report code, or to look at a sweep that is still running)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual_pretraining.report", description=main.__doc__)
    parser.add_argument("output_dir", type=Path, help="a folder holding results.json")
    args = parser.parse_args(argv)
    write_report(json.loads((args.output_dir / "results.json").read_text()), args.output_dir)


if __name__ == "__main__":
    main()
