"""Diagnostic (learned_router_findings.md, "Smoothing the router's score over preceding tokens"): would smoothing
the learned router's per-token logit over the preceding tokens of the same sequence route more new-language tokens
to the expansion at the same share of old tokens reaching it? Nothing is trained here beyond the routers; no
adapter training.

The setup is the benchmark's own (``benchmarks/continual_pretraining/run.py``, the routed FFN rows of its results
folder, which route with peft-scale 0.1.0's router settings, ``methods.ROUTER_0_1_0``: bundled SmolLM2-135M, fp32,
seed 0, ``preserve_layers=8``): the router's new side is the first ``ROUTER_BLOCKS``
new-language training blocks; the old side is (a) the old-language training blocks run.py gives the router, or (b)
the base-model samples cached in that folder's ``base_samples.pt`` (run.py's cache, not in git: a
run.py command with that ``--output-dir`` draws it again), cut with ``cut_like_new_data`` as ``run.old_sides_for`` cuts
them. Features: ``layer_inputs`` through the base model (adapter disabled), as ``fit_router`` computes them. The
split and the trial router are ``fit_router``'s (``_split_sequences``, ``_train_router``, seed 0), so the w=1 row is
``fit_router``'s held-out report (checked: ``w1_check`` against a ``fit_router`` call made here with the rows'
settings; and, full run only, ``recorded_check`` against the report and routing in the folder's results.json); the kept router (refitted on every sequence, as ``fit_router`` keeps it) is trained
too, for the benchmark's evaluation text, where it is the router the runs routed with.

Candidates, per sequence and causal (token t uses tokens <= t only), on the router's logit:
``mean_w``: the mean over the last w tokens (the window truncated at the sequence start; w=1 is today's router);
``ema_a``: s_0 = l_0, s_t = a s_{t-1} + (1 - a) l_t. For each, the threshold is set on the calibration part's old
tokens (``_threshold(sigmoid(smoothed), 0.01)``), and reported: on the held-out part (old -> base, new ->
expansion, all and first ``FIRST_TOKENS`` tokens of each sequence); on the benchmark's evaluation blocks
(``text.new_eval``, ``text.old_eval``: new -> expansion, old -> expansion, all, first tokens and by position), for
the trial router and for the kept router (the kept router with the trial router's calibrated threshold, as
``fit_router`` sets it). The (a) runs were made before ``fit_router`` refitted its kept router, so they routed with
the trial router; the (b) runs with the kept router: the w=1 check compares each with its own. Where
``_threshold``'s floor of 0.5 binds (the smoothed old scores leave fewer than 1% of the calibration tokens above
0.5), the row also has ``unfloored``: the same candidate at the threshold that lets exactly the 1% through.

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_smoothing.py

Writes router_smoothing.json in benchmarks/results/continual_pretraining/cpu_40_steps/ (``--output-dir``: elsewhere).
``--quick`` (``tests/benchmarks/test_diagnostics.py``): run.py's ``--quick`` settings (a tiny random Llama, a few
blocks; the base samples drawn into the output folder), no recorded results to check against; its numbers mean
nothing.
"""
import argparse, functools, json, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
# the results of the run it diagnoses: its JSON goes there (and its inputs come from there)
RESULTS = HERE.parents[3] / "benchmarks" / "results" / "continual_pretraining" / "cpu_40_steps"
sys.path.insert(0, str(HERE.parents[3]))
from benchmarks.continual_pretraining import run  # noqa: E402
from benchmarks.continual_pretraining.data import build_text, documents_or_summaries  # noqa: E402
from benchmarks.methods import ROUTER_0_1_0, prepare_method  # noqa: E402
from peft_scale import fit_router  # noqa: E402
from peft_scale.router_fitting import (  # noqa: E402
    FIRST_TOKENS, ROUTER_LR, ROUTER_STEPS, ROUTER_WEIGHT_DECAY, _adapters_disabled, _split_sequences, _threshold,
    _train_router, cut_like_new_data, default_prompts, layer_inputs, token_sequences,
)  # fmt: skip

MAX_OLD_ERROR, BATCH = 0.01, 8  # the rows' max_old_error (ROUTER_0_1_0) and fit_router's feature batch
WINDOWS = (1, 2, 4, 8, 16, 32)
ALPHAS = (0.5, 0.8, 0.9)
ROWS = ("scale_ffn_routed", "scale_ffn_routed_samples")  # the rows it reproduces, one per old side


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: run.py --quick's tiny model and text")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes (default: %(default)s)")
    return parser.parse_args(argv)


@functools.lru_cache(maxsize=1)  # one setup per process: the diagnostics run one after another share it
def setup(quick: bool, output_dir: Path) -> SimpleNamespace:
    """The benchmark's model, text, old sides and adapter, and the features of every sequence (what the
    diagnostics of this folder share): full, this folder's settings (checked against its results.json and
    base_samples.pt); ``quick``, run.py ``--quick``'s (the base samples drawn into ``output_dir``)."""
    t_start = time.time()
    torch.set_num_threads(1)
    common = ["--methods", *ROWS, "--output-dir", str(output_dir if quick else RESULTS)]
    if quick:
        args = run.parse_args(["--quick", *common])
    else:
        args = run.parse_args([*common, "--lrs", "1e-3", "--steps", "40", "--eval-every", "20"])
    torch.set_num_threads(args.threads)
    model, tokenizer = run.load_model(args.model)
    model = model.eval()
    sizes = run.default_sizes(model.config, args)
    recorded = None
    if not quick:
        recorded = json.loads((RESULTS / "results.json").read_text())
        assert run.settings_of(args, sizes) == recorded["settings"], "not this folder's settings"
    text = build_text(
        tokenizer, new_documents=documents_or_summaries(args.new_text, "es")[: args.max_documents],
        old_documents=documents_or_summaries(args.old_text, "en")[: args.max_documents],
        held_out_documents=args.held_out_documents, eval_blocks=args.eval_blocks,
        train_blocks=args.steps * args.batch_size, seq_len=args.seq_len, replay_fraction=0.0, seed=args.seed,
        old_train_blocks=run.ROUTER_BLOCKS,
    )  # fmt: skip
    if quick:
        samples = run.base_samples(model, args)[0]  # drawn (and cached) in output_dir, as run.py draws them
    else:
        samples = torch.load(RESULTS / "base_samples.pt")["samples"]
        assert run.digest(samples) == recorded["base_samples"]["digest"], "not the cached samples the runs used"
    windows = cut_like_new_data(list(samples[: run.ROUTER_BLOCKS]), list(text.new_train[: run.ROUTER_BLOCKS]),
                                default_prompts(model), args.seed)  # fmt: skip (as run.old_sides_for)
    old_sides = {"old_data": text.old_train, "base_samples": [{"input_ids": ids} for ids in windows]}
    # the rows' router: peft-scale 0.1.0's settings (per token, held-out calibration at 1%), as run.py builds them
    sizes = run.with_scale_options(sizes, (("router", {**ROUTER_0_1_0, "seed": args.seed}),))
    torch.manual_seed(args.seed)
    peft_model = prepare_method("scale_ffn_routed", model, sizes)
    scale_model = peft_model.base_model
    router = scale_model.scale_router["default"]
    layer = scale_model.router_layer("default")
    base = scale_model.model
    vocab = base.config.vocab_size
    seconds = {"setup": time.time() - t_start}

    # ------------------------------------------------------------------ features (the base model's stream entering L)
    t = time.time()
    sequences = {
        "new": token_sequences(text.new_train[: run.ROUTER_BLOCKS], "new_data", vocab),
        **{side: token_sequences(data, "old_data", vocab) for side, data in old_sides.items()},
        "new_eval": token_sequences(text.new_eval, "new_eval", vocab),
        "old_eval": token_sequences(text.old_eval, "old_eval", vocab),
    }
    base.eval()
    with _adapters_disabled(scale_model):
        feats = {name: layer_inputs(base, layer, router.features, seqs, BATCH) for name, seqs in sequences.items()}
    seconds["features"] = time.time() - t
    return SimpleNamespace(
        args=args, quick=quick, output_dir=output_dir, t_start=t_start, seconds=seconds, recorded=recorded,
        model=model, tokenizer=tokenizer, sizes=sizes, text=text, samples=samples, old_sides=old_sides,
        peft_model=peft_model, scale_model=scale_model, router=router, layer=layer, base=base, vocab=vocab,
        sequences=sequences, feats=feats,
    )  # fmt: skip


# ------------------------------------------------------------------ smoothing
def mean_last(logit: torch.Tensor, w: int) -> torch.Tensor:
    if w == 1:
        return logit
    c = torch.cat([torch.zeros(1, dtype=torch.float64), logit.double().cumsum(0)])
    end = torch.arange(1, len(logit) + 1)
    start = (end - w).clamp_min(0)
    return ((c[end] - c[start]) / (end - start)).float()


def ema(logit: torch.Tensor, a: float) -> torch.Tensor:
    out = torch.empty_like(logit)
    s = logit[0]
    for i in range(len(logit)):
        s = logit[i] if i == 0 else a * s + (1 - a) * logit[i]
        out[i] = s
    return out


CANDIDATES = {**{f"mean_{w}": (lambda l, w=w: mean_last(l, w)) for w in WINDOWS},
              **{f"ema_{a:g}": (lambda l, a=a: ema(l, a)) for a in ALPHAS}}  # fmt: skip


def seq_logits(router, features: list, params) -> list:
    """Per-sequence logits, computed on the concatenation (as fit_router scores a part) and split back."""
    if not features:
        return []
    lengths = [len(f) for f in features]
    return list(router.logits(torch.cat(features), params).split(lengths))


def share(scores: list, threshold: float, to_expansion: bool, first: bool = False) -> float:
    x = torch.cat([s[:FIRST_TOKENS] if first else s for s in scores])
    return float((x >= threshold).float().mean() if to_expansion else (x < threshold).float().mean())


def exact_threshold(old_scores: torch.Tensor, max_old_error: float) -> float:
    """``_threshold`` without its floor of 0.5: the lowest threshold with at most ``max_old_error`` of the old
    scores at or above it (to compare candidates at the same calibration error where the floor binds)."""
    allowed = int(max_old_error * len(old_scores))
    highest = old_scores.sort(descending=True).values
    return float(torch.nextafter(highest[allowed], torch.tensor(2.0)))


POSITIONS = {"pos_0": (0, 1), "pos_1_7": (1, FIRST_TOKENS), "pos_8_31": (FIRST_TOKENS, 32), "pos_32_127": (32, None)}


def measure(sc: dict, thr: float) -> dict:
    """Every share at threshold ``thr`` (``sc``: (data, part or router) -> per-sequence scores)."""
    row = {
        "threshold": thr,
        "calibration_old_to_expansion": share(sc[("old", "calibration")], thr, True),
        "calibration_new_to_expansion": share(sc[("new", "calibration")], thr, True),
        "held_out_old_to_base": share(sc[("old", "held_out")], thr, False),
        "held_out_new_to_expansion": share(sc[("new", "held_out")], thr, True),
        "held_out_first_old_to_base": share(sc[("old", "held_out")], thr, False, True),
        "held_out_first_new_to_expansion": share(sc[("new", "held_out")], thr, True, True),
    }
    for router_name in ("trial", "kept"):
        for lang in ("new", "old"):
            s = sc[(f"{lang}_eval", router_name)]
            row[f"eval_{router_name}_{lang}_to_expansion"] = share(s, thr, True)
            row[f"eval_{router_name}_{lang}_first_to_expansion"] = share(s, thr, True, True)
            for name, (a, b) in POSITIONS.items():
                row[f"eval_{router_name}_{lang}_{name}_to_expansion"] = share([x[a:b] for x in s], thr, True)
    return row


def fit_routers(S: SimpleNamespace, old_side: str):
    """``fit_router``'s split and routers for ``old_side`` (``"old_data"`` or ``"base_samples"``): ``(sides, splits,
    fit, trial, kept)``, the per-side features, the split, the fitting part's pooled features, the trial router
    (fitted on the fitting part) and the kept router (on every sequence). Shared by the later diagnostics."""
    sides = {"new": S.feats["new"], "old": S.feats[old_side]}
    generator = torch.Generator().manual_seed(S.args.seed)
    splits = {side: _split_sequences(len(f), generator) for side, f in sides.items()}
    fit = {side: torch.cat([sides[side][i] for i in splits[side][0]]) for side in sides}
    trial = _train_router(S.router, fit["new"], fit["old"], S.args.seed)
    kept = _train_router(S.router, torch.cat(sides["new"]), torch.cat(sides["old"]), S.args.seed)
    return sides, splits, fit, trial, kept


def checks(S: SimpleNamespace, old_side: str, w1: dict, row: str) -> dict:
    """The w=1 candidate against ``fit_router``'s own report, fitted here with the rows' settings on the same data
    (``w1_check``), and, full run only, against the report and routing recorded in results.json
    (``recorded_check``; the (a) runs were made before ``fit_router`` refitted its kept router on every sequence,
    so they routed with the trial router, the (b) runs with the kept router)."""
    report = fit_router(S.peft_model, S.text.new_train[: run.ROUTER_BLOCKS], S.old_sides[old_side], progress=False)
    pairs = {
        "threshold": (w1["threshold"], report.threshold),
        "held_out_old_to_base": (w1["held_out_old_to_base"], report.old_to_base),
        "held_out_new_to_expansion": (w1["held_out_new_to_expansion"], report.new_to_expansion),
        "held_out_first_old_to_base": (w1["held_out_first_old_to_base"], report.first_tokens_old_to_base),
        "held_out_first_new_to_expansion": (w1["held_out_first_new_to_expansion"], report.first_tokens_new_to_expansion),
        "calibration_new_to_expansion": (w1["calibration_new_to_expansion"], report.calibration_new_to_expansion),
    }  # fmt: skip
    out = {"w1_check": {k: {"here": a, "fit_router": b, "equal": abs(a - b) < 1e-6} for k, (a, b) in pairs.items()}}
    if S.recorded is not None:
        run_key = f"{row}@0.001"
        rep = S.recorded["runs"][run_key]["router"]["report"]
        final = S.recorded["runs"][run_key]["final"]
        used = "kept" if "fitted_new_to_expansion" in rep else "trial"
        recorded = {
            "threshold": (w1["threshold"], rep["threshold"]),
            "held_out_old_to_base": (w1["held_out_old_to_base"], rep["old_to_base"]),
            "held_out_new_to_expansion": (w1["held_out_new_to_expansion"], rep["new_to_expansion"]),
            "eval_new_to_base": (1 - w1[f"eval_{used}_new_to_expansion"], final["new_routed_to_preservation"]),
            "eval_old_to_base": (1 - w1[f"eval_{used}_old_to_expansion"], final["old_routed_to_preservation"]),
        }  # fmt: skip
        out["router_the_run_routed_with"] = used
        out["recorded_check"] = {k: {"here": a, "recorded": b, "equal": abs(a - b) < 1e-6} for k, (a, b) in recorded.items()}
    return out


def main(argv=None) -> dict:
    """Every candidate, for each old side; writes router_smoothing.json (and returns what it wrote)."""
    options = parse_args(argv)
    S = setup(options.quick, options.output_dir)
    results = {}
    for old_side, row in zip(("old_data", "base_samples"), ROWS):
        t = time.time()
        sides, splits, fit, trial, kept = fit_routers(S, old_side)
        train_seconds = time.time() - t
        logits = {(side, part): seq_logits(S.router, [sides[side][i] for i in splits[side][j]], trial)
                  for side in sides for part, j in (("calibration", 1), ("held_out", 2))}  # fmt: skip
        for name in ("new_eval", "old_eval"):
            logits[(name, "trial")] = seq_logits(S.router, S.feats[name], trial)
            logits[(name, "kept")] = seq_logits(S.router, S.feats[name], kept)
        rows = {}
        for cand, smooth in CANDIDATES.items():
            sc = {key: [torch.sigmoid(smooth(l)) for l in ls] for key, ls in logits.items()}
            calibration_old = torch.cat(sc[("old", "calibration")])
            thr = _threshold(calibration_old, MAX_OLD_ERROR)
            rows[cand] = measure(sc, thr)
            exact = exact_threshold(calibration_old, MAX_OLD_ERROR)
            if exact != thr:  # _threshold's floor of 0.5 binds: the same share of old tokens without the floor
                rows[cand]["unfloored"] = measure(sc, exact)
        scoring_seconds = time.time() - t - train_seconds
        results[old_side] = {
            "label": run.OLD_SIDES[old_side],
            "reproduces_run": row,
            **checks(S, old_side, rows["mean_1"], row),
            "tokens": {side: {part: sum(len(sides[side][i]) for i in splits[side][j])
                              for part, j in (("fitting", 0), ("calibration", 1), ("held_out", 2))} for side in sides},
            "sequences": {side: {part: len(splits[side][j]) for part, j in (("fitting", 0), ("calibration", 1),
                                                                            ("held_out", 2))} for side in sides},
            "eval_tokens": {name: sum(len(f) for f in S.feats[name]) for name in ("new_eval", "old_eval")},
            "candidates": rows,
            "seconds": {"router_training": train_seconds, "scoring": scoring_seconds},
        }  # fmt: skip
        result = results[old_side]
        print(f"\nold side: {run.OLD_SIDES[old_side]} (w=1 is fit_router's report: "
              f"{all(v['equal'] for v in result['w1_check'].values())}; reproduces the recorded {row} row: "
              f"{all(v['equal'] for v in result['recorded_check'].values()) if 'recorded_check' in result else '-'})")
        print("  (* the same candidate at its unfloored threshold, where _threshold's floor of 0.5 binds)")
        print("  candidate | thr | held-out old->base | new->exp | first8 old->base | first8 new->exp || eval (trial) new->exp "
              "(first8) | old->exp (first8) || eval (kept) new->exp (first8) | old->exp (first8)")
        for cand, r in [(c, x) for c, r0 in rows.items() for c, x in ((c, r0), (c + "*", r0.get("unfloored"))) if x]:
            print(f"  {cand:9s} | {r['threshold']:.4f} | {r['held_out_old_to_base']:.1%} | {r['held_out_new_to_expansion']:.1%}"
                  f" | {r['held_out_first_old_to_base']:.1%} | {r['held_out_first_new_to_expansion']:.1%}"
                  f" || {r['eval_trial_new_to_expansion']:.1%} ({r['eval_trial_new_first_to_expansion']:.1%})"
                  f" | {r['eval_trial_old_to_expansion']:.1%} ({r['eval_trial_old_first_to_expansion']:.1%})"
                  f" || {r['eval_kept_new_to_expansion']:.1%} ({r['eval_kept_new_first_to_expansion']:.1%})"
                  f" | {r['eval_kept_old_to_expansion']:.1%} ({r['eval_kept_old_first_to_expansion']:.1%})", flush=True)

    S.seconds["total"] = time.time() - S.t_start
    out = {
        "settings": {
            "benchmark_settings": run.settings_of(S.args, S.sizes), "quick": S.quick, "router_blocks": run.ROUTER_BLOCKS,
            "first_tokens": FIRST_TOKENS, "router_hidden": S.router.hidden, "layer": S.sizes.preserve_layers,
            "steps": ROUTER_STEPS, "lr": ROUTER_LR, "weight_decay": ROUTER_WEIGHT_DECAY, "max_old_error": MAX_OLD_ERROR,
            "feature_batch_size": BATCH, "windows": list(WINDOWS), "ema_alphas": list(ALPHAS),
            "base_samples_digest": run.digest(S.samples),
            "smoothing": "on the router's logit, per sequence, causal; mean_w: mean over the last w tokens (truncated "
                         "at the sequence start); ema_a: s_0 = l_0, s_t = a s_(t-1) + (1 - a) l_t; score = sigmoid",
            "threshold": "_threshold(scores of the trial router's calibration-part old tokens, 0.01), per candidate; "
                         "the kept router is scored with the same threshold (as fit_router does); 'unfloored': the "
                         "same without _threshold's floor of 0.5, where it binds",
            "eval_positions": {k: list(v) for k, v in POSITIONS.items()},
            "machine": run.machine_description("cpu"), "torch_threads": torch.get_num_threads(),
        },
        "seconds": S.seconds,
        "old_sides": results,
    }  # fmt: skip
    path = S.output_dir / "router_smoothing.json"
    run.write_json(path, out)
    print(f"\n{S.seconds['total']:.0f} s; wrote {path}")
    return out


if __name__ == "__main__":
    main()
