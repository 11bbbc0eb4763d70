"""Diagnostic (learned_router_findings.md, "Where the smoothed average starts"): the smoothed router (EMA, a = 0.8)
decides a sequence's first token on that token's logit alone (s_0 = l_0), and the next few mostly on it; with old
data as the router's old side, 10.9% of the first 8 old-language tokens of each evaluation block reached the
expansion (at 2.34 nats of drift each), which is what missed the drift goal. Would starting the average from a
value that stands for old text (s_-1 = c, s_0 = a c + (1 - a) l_0) keep those tokens on the base model, and how
many new-language tokens would it cost?

The setup, features, split and routers are ``router_smoothing.py``'s (imported: the benchmark's model, text, old
sides, ``fit_router``'s split and trial/kept routers). Candidates for ``c``, from the router's own logits on the old
side's fitting tokens (the trial router: its fitting part; the kept router: all the old side, as ``fit_router``
keeps it): ``token`` (no start value: today), ``old_median``, ``old_mean``, ``old_q90`` (the 90th percentile, a
weaker pull), ``zero`` (logit 0, p = 0.5); and weighted averages (``ema_from``): ``normalised`` (the bias-corrected
average: no start value, the first token no heavier than the next), ``old_median_w1`` and ``old_q90_w1`` (the start
value counted as one token, where ``s_-1 = c`` counts it as ``1 / (1 - a) = 5``). For each, the threshold is calibrated as ``fit_router`` does
(``_threshold`` on the trial router's smoothed calibration-part old scores, 1%), and the shares are reported as in
``router_smoothing.py``.

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_smoothing_start.py

Writes router_smoothing_start.json in benchmarks/results/continual_pretraining/cpu_40_steps/.
"""
import json, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import router_smoothing as rs  # noqa: E402  (the setup and features, computed on import)

A = 0.8
START_TOKENS = 16  # positions reported one by one


def ema_from(logit: torch.Tensor, a: float, start) -> torch.Tensor:
    """s_-1 = start (None: s_0 = l_0), s_t = a s_(t-1) + (1 - a) l_t, as ``routing.smooth_logits``. ``start`` may
    also be ``(c, w)``: a weighted average, the start value ``c`` counted as ``w`` tokens (``c`` None and ``w`` 0: the
    bias-corrected average, every token its own weight from the first one on)::

        S_t = a S_(t-1) + l_t,  W_t = a W_(t-1) + 1,  S_-1 = w c,  W_-1 = w,  s_t = S_t / W_t

    (``w = 1 / (1 - a)`` is the plain ``s_-1 = c`` above)."""
    out = torch.empty_like(logit)
    if isinstance(start, tuple):
        c, w = start
        total, weight = torch.tensor(w * (c or 0.0)), torch.tensor(float(w))
        for i in range(len(logit)):
            total, weight = a * total + logit[i], a * weight + 1
            out[i] = total / weight
        return out
    s = None if start is None else torch.tensor(float(start))
    for i in range(len(logit)):
        s = logit[i] if s is None else a * s + (1 - a) * logit[i]
        out[i] = s
    return out


def starts(old_logits: torch.Tensor) -> dict:
    median, q90 = float(old_logits.median()), float(old_logits.quantile(0.9))
    return {
        "token": None, "old_median": median, "old_mean": float(old_logits.mean()), "old_q90": q90, "zero": 0.0,
        # weighted starts (ema_from): the bias-corrected average, and the old side's value counted as one token
        "normalised": (None, 0.0), "old_median_w1": (median, 1.0), "old_q90_w1": (q90, 1.0),
    }  # fmt: skip


def main() -> None:
    """Every start value, for each old side; writes router_smoothing_start.json."""
    results = {}
    for old_side in ("old_data", "base_samples"):
        t = time.time()
        sides, splits, fit, trial, kept = rs.fit_routers(old_side)
        logits = {(side, part): rs.seq_logits([sides[side][i] for i in splits[side][j]], trial)
                  for side in sides for part, j in (("calibration", 1), ("held_out", 2))}  # fmt: skip
        for name in ("new_eval", "old_eval"):
            logits[(name, "trial")] = rs.seq_logits(rs.feats[name], trial)
            logits[(name, "kept")] = rs.seq_logits(rs.feats[name], kept)
        with torch.no_grad():
            trial_starts = starts(rs.router.logits(fit["old"], trial))
            kept_starts = starts(rs.router.logits(torch.cat(sides["old"]), kept))
        rows = {}
        for cand in trial_starts:
            sc = {}
            for key, ls in logits.items():
                start = (kept_starts if key[1] == "kept" else trial_starts)[cand]
                sc[key] = [torch.sigmoid(ema_from(l, A, start)) for l in ls]
            thr = rs._threshold(torch.cat(sc[("old", "calibration")]), rs.MAX_OLD_ERROR)
            row = rs.measure(sc, thr)
            row["start"] = {"trial": trial_starts[cand], "kept": kept_starts[cand]}
            for lang in ("new", "old"):  # the kept router, position by position (the first START_TOKENS)
                s = torch.stack([x[:START_TOKENS] for x in sc[(f"{lang}_eval", "kept")]])
                row[f"eval_kept_{lang}_by_position_to_expansion"] = (s >= thr).float().mean(0).tolist()
            rows[cand] = row
        results[old_side] = {"candidates": rows, "seconds": time.time() - t}
        print(f"\nold side: {rs.run.OLD_SIDES[old_side]} (EMA a = {A}; start values: trial / kept router's logits)")
        print("  start | c (kept) | thr | held-out old->base | new->exp | first8 old->base | first8 new->exp || "
              "eval (kept) new->exp (first8) | old->exp (first8)")
        for cand, r in rows.items():
            c = r["start"]["kept"]
            c = c[0] if isinstance(c, tuple) else c
            print(f"  {cand:13s} | {'-' if c is None else f'{c:.2f}':>6s} | {r['threshold']:.4f}"
                  f" | {r['held_out_old_to_base']:.1%} | {r['held_out_new_to_expansion']:.1%}"
                  f" | {r['held_out_first_old_to_base']:.1%} | {r['held_out_first_new_to_expansion']:.1%}"
                  f" || {r['eval_kept_new_to_expansion']:.1%} ({r['eval_kept_new_first_to_expansion']:.1%})"
                  f" | {r['eval_kept_old_to_expansion']:.1%} ({r['eval_kept_old_first_to_expansion']:.1%})", flush=True)
            print("      by position, new->exp: " + " ".join(f"{x:.2f}" for x in r["eval_kept_new_by_position_to_expansion"])
                  + "\n      by position, old->exp: " + " ".join(f"{x:.2f}" for x in r["eval_kept_old_by_position_to_expansion"]))

    out = {
        "settings": {"from": "router_smoothing.py's setup", "ema_a": A, "start_tokens": START_TOKENS,
                     "starts": "logit statistics of the router's old-side fitting tokens (trial: fitting part; kept: all)",
                     "machine": rs.run.machine_description("cpu"), "torch_threads": torch.get_num_threads()},
        "seconds": {**rs.seconds, "total": time.time() - rs.t_start},
        "old_sides": results,
    }  # fmt: skip
    (rs.RESULTS / "router_smoothing_start.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {rs.RESULTS / 'router_smoothing_start.json'}")


if __name__ == "__main__":  # (importing this module gives ema_from and starts: router_language_switch.py)
    main()
