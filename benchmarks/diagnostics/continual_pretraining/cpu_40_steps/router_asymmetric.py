"""Diagnostic (learned_router_findings.md, "An asymmetric average"): the language-switch diagnostic found that the
smoothed router (EMA, a = 0.8) carries Spanish into the English tokens after a switch (85% of the first 8 English
tokens after Spanish reached the expansion, against 39% per token). Would an average that falls towards the base
model faster than it rises towards the expansion fix that, and what would it cost on single-language text?

    s_0 = l_0,   s_t = a_t s_(t-1) + (1 - a_t) l_t,   a_t = rise if l_t >= s_(t-1) else fall

``fall = rise`` is today's EMA; ``fall = 0`` follows every drop at once (``s_t = l_t`` when the token looks older
than the average), so a token reaches the expansion only when its own logit and the average both say so.

Setup, features, split and routers: ``router_smoothing.py``'s (imported). Thresholds calibrated as ``fit_router``
does for each rule (1% of the trial router's smoothed calibration-part old scores). Reported with the kept router:
the benchmark's 16 evaluation blocks per language (all tokens and the first 8 of each), and the switch sequences of
``router_language_switch.py`` (each evaluation block's halves joined, English -> Spanish and Spanish -> English).
Nothing of this is in the library; it decides whether an asymmetric option is worth building.

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_asymmetric.py

Writes router_asymmetric.json in benchmarks/results/continual_pretraining/cpu_40_steps/.
"""
import json, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import router_smoothing as rs  # noqa: E402  (the setup and features, computed on import)

RISE, HALF = 0.8, 64
RULES = {"per_token": None, "ema_0.8": RISE, "fall_0.4": 0.4, "fall_0": 0.0}  # rule -> fall (None: no average)
OFFSETS = {"0-7": (0, 8), "8-15": (8, 16), "16-63": (16, HALF)}


def average(logit: torch.Tensor, fall) -> torch.Tensor:
    """The asymmetric average above along one sequence (``fall`` None: the logits themselves)."""
    if fall is None:
        return logit
    out = torch.empty_like(logit)
    s = None
    for i in range(len(logit)):
        if s is None:
            s = logit[i]
        else:
            a = fall if logit[i] < s else RISE
            s = a * s + (1 - a) * logit[i]
        out[i] = s
    return out


en, es = list(rs.text.old_eval), list(rs.text.new_eval)
joined = {
    "en->es": [torch.cat([e[:HALF], s[:HALF]]) for e, s in zip(en, es)],
    "es->en": [torch.cat([s[-HALF:], e[-HALF:]]) for e, s in zip(en, es)],
}
rs.base.eval()
with rs._adapters_disabled(rs.scale_model):
    switch_feats = {name: rs.layer_inputs(rs.base, rs.layer, rs.router.features, seqs, rs.BATCH)
                    for name, seqs in joined.items()}  # fmt: skip

results = {}
for old_side in ("old_data", "base_samples"):
    sides, splits, fit, trial, kept = rs.fit_routers(old_side)
    calibration_old = rs.seq_logits([sides["old"][i] for i in splits["old"][1]], trial)
    evals = {lang: rs.seq_logits(rs.feats[f"{lang}_eval"], kept) for lang in ("new", "old")}
    switch = {name: rs.seq_logits(f, kept) for name, f in switch_feats.items()}
    rows = {}
    for rule, fall in RULES.items():
        thr = rs._threshold(torch.cat([torch.sigmoid(average(l, fall)) for l in calibration_old]), rs.MAX_OLD_ERROR)
        row = {"threshold": thr}
        for lang, ls in evals.items():
            to_exp = [torch.sigmoid(average(l, fall)) >= thr for l in ls]
            row[f"eval_{lang}_to_expansion"] = float(torch.cat(to_exp).float().mean())
            row[f"eval_{lang}_first8_to_expansion"] = float(torch.cat([x[:8] for x in to_exp]).float().mean())
        for name, ls in switch.items():
            first, second = name.split("->")
            to_exp = torch.stack([torch.sigmoid(average(l, fall)) >= thr for l in ls]).float()
            row[name] = {
                f"{first} (before) -> expansion": float(to_exp[:, :HALF].mean()),
                f"{second} (after) -> expansion": float(to_exp[:, HALF:].mean()),
                **{f"{second} after, offset {k} -> expansion": float(to_exp[:, HALF + a : HALF + b].mean())
                   for k, (a, b) in OFFSETS.items()},
            }  # fmt: skip
        rows[rule] = row
    results[old_side] = {"label": rs.run.OLD_SIDES[old_side], "rules": rows}
    print(f"\nold side: {rs.run.OLD_SIDES[old_side]} (kept router; share of tokens sent to the expansion)")
    for rule, row in rows.items():
        print(f"  {rule:10s} thr {row['threshold']:.4f} | eval Spanish {row['eval_new_to_expansion']:.1%} "
              f"(first 8 {row['eval_new_first8_to_expansion']:.1%}) English {row['eval_old_to_expansion']:.1%} "
              f"(first 8 {row['eval_old_first8_to_expansion']:.1%})")
        for name in switch:
            print("     " + name + ": " + ", ".join(f"{k} {v:.1%}" for k, v in row[name].items()), flush=True)

out = {
    "settings": {"from": "router_smoothing.py's setup", "rise": RISE, "rules": RULES, "half": HALF,
                 "offsets": OFFSETS, "machine": rs.run.machine_description("cpu"),
                 "torch_threads": torch.get_num_threads()},
    "seconds": {**rs.seconds, "total": time.time() - rs.t_start},
    "old_sides": results,
}  # fmt: skip
(rs.RESULTS / "router_asymmetric.json").write_text(json.dumps(out, indent=1))
print(f"\nwrote {rs.RESULTS / 'router_asymmetric.json'}")
