"""Diagnostic (learned_router_findings.md, "Tenth pass"): is the first token of a window worth reading, and what is
the best any threshold could do with today's router?

Of the benchmark's 16 English evaluation blocks, the (a) router sent 3 of 16 position-0 tokens and 11 of 112 tokens
at positions 1-7 to the expansion (``router_smoothing.json``). The moving average starts from the first token's own
logit, so a misrouted first token can carry its followers. Three rules on the kept router's logits, smoothed with
``a = 0.8`` as the benchmark's rows route: ``ema`` (today), ``ema_own`` (position 0 decided on its own logit, the
average started at position 1) and ``ema_base`` (position 0 always to the base model, the average from position 1).
For each: the threshold ``fit_router`` would calibrate (1% and 0.5% of the trial router's calibration-part old
scores) and what it gives; and the frontier: over thresholds swept on the evaluation itself (an oracle, not a
calibration), the largest share of new tokens sent to the expansion with at most 0.1 / 0.2 / 0.3 / 0.43% of the old
tokens sent there (0.43% x ~2.4 nats per misrouted token is the 0.01 drift goal). Also the raw logit's AUC (new
against old) at single positions. The setup and routers are ``router_smoothing.py``'s, the evaluation the first
``router_first_tokens.EVAL_BLOCKS`` held-out blocks of each language.

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_first_token_rules.py

Writes router_first_token_rules.json in benchmarks/results/continual_pretraining/cpu_40_steps/ (``--output-dir``:
elsewhere). ``--quick``: ``router_first_tokens.py --quick``'s setup and evaluation blocks
(``tests/benchmarks/test_diagnostics.py``; its numbers mean nothing).
"""
import json, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import router_first_tokens as ft  # noqa: E402  (router_smoothing's setup and features: rs.setup)
from peft_scale.router_fitting import _threshold  # noqa: E402

rs = ft.rs
A = 0.8
RULES = {"ema": None, "ema_own": "own", "ema_base": "base"}
POSITIONS = (0, 1, 2, 4, 8, 32)
FRONTIER = (0.001, 0.002, 0.003, 0.0043)
GRID = torch.tensor([0.5] + [1 - 10 ** (-x / 8) for x in range(3, 40)])


def smoothed(logit: torch.Tensor, first) -> torch.Tensor:
    """The moving average along one sequence; ``first``: None (from position 0), ``"own"`` or ``"base"``."""
    out = torch.empty_like(logit)
    s = None
    for i in range(len(logit)):
        if i == 0 and first:
            out[0] = logit[0] if first == "own" else -1e4  # -1e4: sigmoid 0, the base model
            continue
        s = logit[i] if s is None else A * s + (1 - A) * logit[i]
        out[i] = s
    return out


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    return float((positive[:, None] > negative[None, :]).float().mean())


def to_expansion(scores: list, threshold: float, first_tokens: bool = False) -> float:
    pool = torch.cat([s[: ft.FIRST_TOKENS] if first_tokens else s for s in scores])
    return float((pool >= threshold).float().mean())


def main(argv=None) -> dict:
    """Every rule, for each old side; writes router_first_token_rules.json (and returns it)."""
    options = rs.parse_args(argv)
    S = rs.setup(options.quick, options.output_dir)
    evaluation = ft.eval_features(S)
    results = {}
    for old_side in ("old_data", "base_samples"):
        sides, splits, _, trial, kept = rs.fit_routers(S, old_side)
        calibration = rs.seq_logits(S.router, [sides["old"][i] for i in splits["old"][1]], trial)
        logits = {lang: rs.seq_logits(S.router, evaluation[lang], kept) for lang in ("new", "old")}
        row = {
            "auc_at_position": {
                p: auc(torch.stack([x[p] for x in logits["new"]]), torch.stack([x[p] for x in logits["old"]]))
                for p in POSITIONS
                if p < min(len(x) for x in logits["new"] + logits["old"])  # (--quick's blocks: 32 tokens)
            }
        }
        for rule, first in RULES.items():
            scores = {lang: [torch.sigmoid(smoothed(x, first)) for x in ls] for lang, ls in logits.items()}
            pool = torch.cat([torch.sigmoid(smoothed(x, first)) for x in calibration])
            entry = row[rule] = {}
            for budget in (0.01, 0.005):
                t = _threshold(pool, budget)
                entry[f"calibrated_{budget}"] = {
                    "threshold": t,
                    "old_to_expansion": to_expansion(scores["old"], t),
                    "old_first_to_expansion": to_expansion(scores["old"], t, True),
                    "new_to_expansion": to_expansion(scores["new"], t),
                }
            points = [(to_expansion(scores["old"], float(t)), to_expansion(scores["new"], float(t))) for t in GRID]
            entry["frontier"] = {b: max([n for o, n in points if o <= b], default=None) for b in FRONTIER}
            print(old_side, rule, json.dumps(entry), flush=True)
        results[old_side] = row
    out = {"machine": rs.run.machine_description("cpu"), "quick": S.quick, "eval_blocks": len(evaluation["old"]),
           "smoothing": A, "results": results, "seconds": round(time.time() - S.t_start)}  # fmt: skip
    path = S.output_dir / "router_first_token_rules.json"
    rs.run.write_json(path, out)
    return out


if __name__ == "__main__":
    main()
