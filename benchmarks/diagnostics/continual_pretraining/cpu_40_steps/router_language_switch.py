"""Diagnostic (learned_router_findings.md, "Text that switches language"): how the smoothed router decides around a
switch of language inside one sequence, the measurement the smoothing diagnostic asked for before smoothing could
be a default. A moving average carries the language before the switch into the tokens after it: after Spanish ->
English, English tokens can reach the expansion (forgetting); after English -> Spanish, Spanish tokens can stay
on the base model (less learning).

Setup, features and routers: ``router_smoothing.py``'s (``router_smoothing.setup``; the benchmark's model, text, old sides, the
trial and kept routers as ``fit_router`` trains them, the threshold calibrated on the trial router's calibration
part as ``fit_router`` does for each rule). Sequences: each of the benchmark's 16 evaluation blocks per language
cut in halves and joined, English -> Spanish (the first 64 tokens of an English block, then the first 64 of a
Spanish one) and Spanish -> English (the last 64 of a Spanish block, then the last 64 of an English one); their
features are computed through the base model as one sequence each (the attention reads across the switch).
Rules: per token (``RouterConfig(smoothing=0)``), EMA 0.8 from the first token (``smoothing=0.8``, the default),
EMA 0.8 from the old side's median logit (peft-scale 0.1.0's ``router_smoothing_start="old"``, removed in 0.2; here
computed by ``ema_from``). Reported with the kept router: the share of each half's tokens
sent to the expansion, and after the switch by offset (0-7, 8-15, 16-63).

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_language_switch.py

Writes router_language_switch.json in benchmarks/results/continual_pretraining/cpu_40_steps/ (``--output-dir``:
elsewhere). ``--quick``: ``router_smoothing.py --quick``'s setup, whose blocks of 32 tokens give halves of 16
(``tests/benchmarks/test_diagnostics.py``; its numbers mean nothing).
"""
import sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import router_smoothing as rs  # noqa: E402  (the setup and features: rs.setup)

A, HALF = 0.8, 64
OFFSETS = {"0-7": (0, 8), "8-15": (8, 16), "16-63": (16, HALF)}


def ema_from(logit: torch.Tensor, a: float, start) -> torch.Tensor:
    """s_-1 = start (None: s_0 = l_0), s_t = a s_(t-1) + (1 - a) l_t, along one sequence."""
    out = torch.empty_like(logit)
    s = None if start is None else torch.tensor(float(start))
    for i in range(len(logit)):
        s = logit[i] if s is None else a * s + (1 - a) * logit[i]
        out[i] = s
    return out


def main(argv=None) -> dict:
    """Every rule, for each old side; writes router_language_switch.json (and returns it)."""
    options = rs.parse_args(argv)
    S = rs.setup(options.quick, options.output_dir)
    half = min(HALF, S.args.seq_len // 2)
    offsets = {k: (a, min(b, half)) for k, (a, b) in OFFSETS.items() if a < half}
    en, es = list(S.text.old_eval), list(S.text.new_eval)
    joined = {
        "en->es": [torch.cat([e[:half], s[:half]]) for e, s in zip(en, es)],
        "es->en": [torch.cat([s[-half:], e[-half:]]) for e, s in zip(en, es)],
    }
    t = time.time()
    S.base.eval()
    with rs._adapters_disabled(S.scale_model):
        switch_feats = {name: rs.layer_inputs(S.base, S.layer, S.router.features, seqs, rs.BATCH)
                        for name, seqs in joined.items()}  # fmt: skip
    feature_seconds = time.time() - t

    results = {}
    for old_side in ("old_data", "base_samples"):
        sides, splits, fit, trial, kept = rs.fit_routers(S, old_side)
        with torch.no_grad():
            trial_start = float(S.router.logits(fit["old"], trial).median())
            kept_start = float(S.router.logits(torch.cat(sides["old"]), kept).median())
        calibration_old = rs.seq_logits(S.router, [sides["old"][i] for i in splits["old"][1]], trial)
        rules = {
            "per_token": lambda l, start: l,
            "ema_token_start": lambda l, start: ema_from(l, A, None),
            "ema_old_start": lambda l, start: ema_from(l, A, start),
        }
        rows = {}
        for rule, smooth in rules.items():
            pool = torch.cat([torch.sigmoid(smooth(l, trial_start)) for l in calibration_old])
            thr = rs._threshold(pool, rs.MAX_OLD_ERROR)
            row = {"threshold": thr}
            for name, feats in switch_feats.items():
                first, second = name.split("->")
                to_exp = torch.stack([torch.sigmoid(smooth(l, kept_start)) >= thr
                                      for l in rs.seq_logits(S.router, feats, kept)]).float()  # fmt: skip
                row[name] = {
                    f"{first} (before) -> expansion": float(to_exp[:, :half].mean()),
                    f"{second} (after) -> expansion": float(to_exp[:, half:].mean()),
                    **{f"{second} after, offset {k} -> expansion": float(to_exp[:, half + a : half + b].mean())
                       for k, (a, b) in offsets.items()},
                }  # fmt: skip
            rows[rule] = row
        results[old_side] = {"label": rs.run.OLD_SIDES[old_side], "start": {"trial": trial_start, "kept": kept_start},
                             "rules": rows}  # fmt: skip
        print(f"\nold side: {rs.run.OLD_SIDES[old_side]} (kept router; share of tokens sent to the expansion)")
        for rule, row in rows.items():
            print(f"  {rule:16s} thr {row['threshold']:.4f}")
            for name in switch_feats:
                print("     " + name + ": " + ", ".join(f"{k} {v:.1%}" for k, v in row[name].items()), flush=True)

    out = {
        "settings": {"from": "router_smoothing.py's setup", "quick": S.quick, "ema_a": A, "half": half,
                     "offsets": offsets, "sequences": {name: len(seqs) for name, seqs in joined.items()},
                     "machine": rs.run.machine_description("cpu"), "torch_threads": torch.get_num_threads()},
        "seconds": {**S.seconds, "switch_features": feature_seconds, "total": time.time() - S.t_start},
        "old_sides": results,
    }  # fmt: skip
    path = S.output_dir / "router_language_switch.json"
    rs.run.write_json(path, out)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
