"""Diagnostic (learned_router_findings.md, "Tenth pass"): the passes with the preservation copy left the drift on
old text equal to the old tokens the router sends to the expansion, and most of those are a window's first tokens
(little context before them). The router is fitted on 64 windows a side, so it sees 64 examples of each position
0..7, and ~8,000 of the positions after. Would it read those first tokens better if it were also fitted on short
windows cut from the same text (each started afresh, so its first tokens have as little context as a window's),
and what does the calibration need?

The setup, features and split are ``router_smoothing.py``'s (``router_smoothing.setup``: the benchmark's model, text
and old sides, ``fit_router``'s split). The routers are scored as the benchmark's smoothed rows route (``router_smoothing=0.8``,
``sequence_scores``); the threshold is calibrated as ``fit_router`` calibrates it (``_threshold`` on the trial
router's calibration-part old scores, 1%) and applied to the kept router, which is the one a run routes with.
Candidates: ``short_K``: every fitting sequence also cut into windows of K tokens at offsets K, 2K, ... (each a
sequence of its own, its features recomputed through the base model), added to the fitting part of both sides
(trial router) and to every sequence (kept router); ``short_K_cal``: the same, and the calibration part's windows
cut the same way added to the calibration tokens; ``short_K_position``: two thresholds, one for a sequence's first
``FIRST_TOKENS`` tokens (calibrated on those of the calibration part and its 8-token windows) and one for the rest.
``short_0`` is today's ``fit_router``. Then, for today's router, the calibration alone at budgets of 1%, 0.5%, 0.3%
and 0.2%: ``held_out`` (today's: the trial router's scores of the calibration part, 13 sequences) against
``cross_fitted`` (five routers, each fitted on four fifths of both sides' sequences and scoring the old fifth it did
not see: every old sequence scored out of fold, 64 instead of 13). The evaluation is on the first ``EVAL_BLOCKS``
held-out blocks of each language (the benchmark evaluates on the first 16), scored by the kept router.

    OMP_NUM_THREADS=1 python benchmarks/diagnostics/continual_pretraining/cpu_40_steps/router_first_tokens.py

Writes router_first_tokens.json in benchmarks/results/continual_pretraining/cpu_40_steps/ (``--output-dir``:
elsewhere). ``--quick``: ``router_smoothing.py --quick``'s setup and ``QUICK_EVAL_BLOCKS`` evaluation blocks a
language (``tests/benchmarks/test_diagnostics.py``; its numbers mean nothing).
"""
import sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import router_smoothing as rs  # noqa: E402  (the setup and features: rs.setup)
from peft_scale.router_fitting import (  # noqa: E402
    FIRST_TOKENS, _adapters_disabled, _split_sequences, _threshold, _train_router, layer_inputs, sequence_scores,
)  # fmt: skip

SMOOTHING = 0.8
FOLDS = 5
BUDGETS = (0.01, 0.005, 0.003, 0.002)
LENGTHS = (0, 8, 32)
QUICK_LENGTHS = (0, 8, 16)  # --quick's blocks are 32 tokens: no window of 32 after the first
EVAL_BLOCKS = 128  # held-out blocks a language (the benchmark's 16 first): 1,024 first tokens, not 128
QUICK_EVAL_BLOCKS = 4


def short_windows(sequences: list, length: int) -> list:
    """Each token sequence cut into windows of ``length`` tokens at offsets ``length``, ``2 length``, ..."""
    return [ids[o : o + length] for ids in sequences for o in range(length, len(ids) - length + 1, length)]


def features(S, sequences: list) -> list:
    if not sequences:
        return []
    with _adapters_disabled(S.scale_model):
        return layer_inputs(S.base, S.layer, S.router.features, sequences, 32)


def shares(scores: list, threshold: float) -> dict:
    every = torch.cat(scores)
    first = torch.cat([s[:FIRST_TOKENS] for s in scores])
    return {"all": float((every >= threshold).float().mean()), "first": float((first >= threshold).float().mean())}


def eval_features(S) -> dict:
    """The features of the first ``EVAL_BLOCKS`` (quick: ``QUICK_EVAL_BLOCKS``) held-out blocks of each language."""
    big = rs.build_text(
        S.tokenizer, new_documents=rs.documents_or_summaries(S.args.new_text, "es")[: S.args.max_documents],
        old_documents=rs.documents_or_summaries(S.args.old_text, "en")[: S.args.max_documents],
        held_out_documents=S.args.held_out_documents, eval_blocks=QUICK_EVAL_BLOCKS if S.quick else EVAL_BLOCKS,
        train_blocks=S.args.steps * S.args.batch_size, seq_len=S.args.seq_len, replay_fraction=0.0,
        seed=S.args.seed,
    )  # fmt: skip
    assert torch.equal(big.old_eval[: len(S.text.old_eval)], S.text.old_eval)
    return {
        lang: features(S, rs.token_sequences(blocks, lang, S.vocab))
        for lang, blocks in (("new", big.new_eval), ("old", big.old_eval))
    }


def position_thresholds(first_pool: list, rest_pool: list) -> tuple[float, float]:
    """One threshold for a sequence's first FIRST_TOKENS tokens, one for the rest, each at max_old_error."""
    first = torch.cat([s[:FIRST_TOKENS] for s in first_pool])
    rest = torch.cat([s[FIRST_TOKENS:] for s in rest_pool])
    return _threshold(first, rs.MAX_OLD_ERROR), _threshold(rest, rs.MAX_OLD_ERROR)


def position_shares(scores: list, thresholds: tuple[float, float]) -> dict:
    first = torch.cat([s[:FIRST_TOKENS] >= thresholds[0] for s in scores]).float()
    rest = torch.cat([s[FIRST_TOKENS:] >= thresholds[1] for s in scores]).float()
    return {"all": float(torch.cat([first, rest]).mean()), "first": float(first.mean())}


def main(argv=None) -> dict:
    """Every candidate and calibration, for each old side; writes router_first_tokens.json (and returns it)."""
    options = rs.parse_args(argv)
    S = rs.setup(options.quick, options.output_dir)
    results = {}
    big_eval = eval_features(S)
    scored = {}
    for old_side in ("old_data", "base_samples"):
        ids = {"new": S.sequences["new"], "old": S.sequences[old_side]}
        sides = {"new": S.feats["new"], "old": S.feats[old_side]}
        generator = torch.Generator().manual_seed(S.args.seed)
        splits = {side: _split_sequences(len(f), generator) for side, f in sides.items()}
        rows = {}
        for length in QUICK_LENGTHS if S.quick else LENGTHS:
            t = time.time()
            extra = {  # (side, part) -> features of the short windows of that part's sequences; part 3: all
                (side, part): features(S, short_windows([ids[side][i] for i in idx], length)) if length else []
                for side in sides for part, idx in enumerate(splits[side])
            }  # fmt: skip
            for side in sides:
                extra[(side, 3)] = extra[(side, 0)] + extra[(side, 1)] + extra[(side, 2)]
            fit = {side: torch.cat([sides[side][i] for i in splits[side][0]] + extra[(side, 0)]) for side in sides}
            trial = _train_router(S.router, fit["new"], fit["old"], S.args.seed)
            kept = _train_router(
                S.router, torch.cat(sides["new"] + extra[("new", 3)]), torch.cat(sides["old"] + extra[("old", 3)]),
                S.args.seed,
            )  # fmt: skip
            seconds = time.time() - t

            def score(feats, params):
                return sequence_scores(S.router, feats, SMOOTHING, params) if feats else []  # (no windows)

            calibration = score([sides["old"][i] for i in splits["old"][1]], trial)
            held_out = {side: score([sides[side][i] for i in splits[side][2]], trial) for side in sides}
            evaluation = {lang: score(big_eval[lang], kept) for lang in ("new", "old")}
            cal_windows = features(S, short_windows([ids["old"][i] for i in splits["old"][1]], FIRST_TOKENS))
            cal_window_scores = score(cal_windows, trial)
            scored[(old_side, length)] = {"calibration": calibration, "eval": evaluation}  # (for calibrations)
            for cal in ("", "_cal"):
                if cal and not length:
                    continue
                pool = calibration + (score(extra[("old", 1)], trial) if cal else [])
                threshold = _threshold(torch.cat(pool), rs.MAX_OLD_ERROR)
                rows[f"short_{length}{cal}"] = {
                    "threshold": threshold,
                    "extra_tokens": {side: sum(len(f) for f in extra[(side, 3)]) for side in sides},
                    "fit_seconds": round(seconds, 1),
                    "held_out_old_to_expansion": shares(held_out["old"], threshold),
                    "held_out_new_to_expansion": shares(held_out["new"], threshold),
                    "eval_old_to_expansion": shares(evaluation["old"], threshold),
                    "eval_new_to_expansion": shares(evaluation["new"], threshold),
                }
                if not cal:
                    thresholds = position_thresholds(calibration + cal_window_scores, calibration)
                    rows[f"short_{length}_position"] = {
                        "thresholds": thresholds,
                        "eval_old_to_expansion": position_shares(evaluation["old"], thresholds),
                        "eval_new_to_expansion": position_shares(evaluation["new"], thresholds),
                    }
                    r = rows[f"short_{length}_position"]
                    print(
                        f"{old_side:13s} short_{length}_position thr {thresholds[0]:.3f}/{thresholds[1]:.3f}  eval "
                        f"old->exp {r['eval_old_to_expansion']['all']:.4f} (first {r['eval_old_to_expansion']['first']:.3f})  "
                        f"new->exp {r['eval_new_to_expansion']['all']:.4f} (first {r['eval_new_to_expansion']['first']:.3f})",
                        flush=True,
                    )
                r = rows[f"short_{length}{cal}"]
                print(
                    f"{old_side:13s} short_{length}{cal:4s} thr {threshold:.3f}  eval old->exp "
                    f"{r['eval_old_to_expansion']['all']:.4f} (first {r['eval_old_to_expansion']['first']:.3f})  "
                    f"new->exp {r['eval_new_to_expansion']['all']:.4f} (first {r['eval_new_to_expansion']['first']:.3f})"
                    f"  held-out old->exp {r['held_out_old_to_expansion']['all']:.4f} "
                    f"(first {r['held_out_old_to_expansion']['first']:.3f})",
                    flush=True,
                )
        results[old_side] = rows
        results[old_side]["calibration"] = calibrations(S, sides, splits, scored[(old_side, 0)])
    out = {
        "machine": rs.run.machine_description("cpu"),
        "smoothing": SMOOTHING,
        "max_old_error": rs.MAX_OLD_ERROR,
        "quick": S.quick,
        "eval_blocks": len(big_eval["old"]),
        "results": results,
        "seconds": round(time.time() - S.t_start),
    }
    path = S.output_dir / "router_first_tokens.json"
    rs.run.write_json(path, out)
    return out


def calibrations(S, sides: dict, splits: dict, today: dict) -> dict:
    """Today's router, its threshold from the held-out calibration part or from out-of-fold scores of every old
    sequence (``FOLDS`` routers), at each budget: the evaluation shares (kept router)."""
    t = time.time()
    generator = torch.Generator().manual_seed(S.args.seed)
    folds = {side: torch.randperm(len(f), generator=generator) % FOLDS for side, f in sides.items()}
    out_of_fold = []
    for k in range(FOLDS):
        inside = {side: [f for f, j in zip(sides[side], folds[side]) if j != k] for side in sides}
        params = _train_router(
            S.router, torch.cat(inside["new"]), torch.cat(inside["old"]), S.args.seed
        )  # fmt: skip
        out_of_fold += sequence_scores(S.router, [f for f, j in zip(sides["old"], folds["old"]) if j == k], SMOOTHING, params)
    seconds = time.time() - t
    pools = {"held_out": torch.cat(today["calibration"]), "cross_fitted": torch.cat(out_of_fold)}
    rows = {"cross_fit_seconds": round(seconds, 1)}
    for budget in BUDGETS:
        for name, pool in pools.items():
            threshold = _threshold(pool, budget)
            row = rows[f"{name}_{budget}"] = {
                "threshold": threshold,
                "eval_old_to_expansion": shares(today["eval"]["old"], threshold),
                "eval_new_to_expansion": shares(today["eval"]["new"], threshold),
            }
            print(
                f"  budget {budget:<6} {name:12s} thr {threshold:.4f} eval old->exp "
                f"{row['eval_old_to_expansion']['all']:.4f} (first {row['eval_old_to_expansion']['first']:.3f}) new->exp "
                f"{row['eval_new_to_expansion']['all']:.4f} (first {row['eval_new_to_expansion']['first']:.3f})",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
