"""Diagnostics of the learned-route rows (findings.md, "Learned router"): nothing here is tuned or trained.

1. The routers, refitted exactly as run.py fits them (the same stage-2 model, data, sizes and seed, hence the same
   report): their score per token role on the whole Task-0 / Task-1 QA, split into the sequences fit_router fitted
   on and those it did not, routed at the calibrated threshold and, for comparison, at 0.5.
2. What the base model's samples (the +samples rows' old side, full+replay_samples' replay) look like.

    python benchmarks/diagnostics/biography/learned_router/diagnose_router.py CACHE_DIR   # run.py's --cache-dir

CACHE_DIR holds the stage-2 model of the full settings (``run.pretrain_or_load``: stages 1-2 are run and cached there
when it does not). The output is diagnose_router.json in benchmarks/results/biography/learned_router/
(``--output-dir``: elsewhere). ``--quick`` (``tests/benchmarks/test_diagnostics.py``): ``Settings.quick()``; its
numbers mean nothing.
"""

import collections
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[4]
# where its JSON goes: the results of the run it diagnoses
RESULTS = REPO / "benchmarks" / "results" / "biography" / "learned_router"
sys.path.insert(0, str(REPO))

from benchmarks.biography.train import TOKEN_ROLES  # noqa: E402
from benchmarks.continual_pretraining.run import write_json  # noqa: E402
from benchmarks.diagnostics.biography.stage2 import parse_args, stage2  # noqa: E402
from benchmarks.methods import prepare_method  # noqa: E402
from peft_scale.router_fitting import _split_sequences  # noqa: E402


def shares(score, mask, threshold):
    sc = score[mask]
    return {"n": int(mask.sum()), "mean_score": round(float(sc.mean()), 3),
            "to_expansion": round(float((sc >= threshold).float().mean()), 3),
            "to_expansion_at_0.5": round(float((sc >= 0.5).float().mean()), 3)}


def main(argv=None) -> dict:
    """Both routers' shares per token role, and the samples; writes diagnose_router.json (and returns it)."""
    args = parse_args(__doc__, RESULTS, argv)
    s, e, base, stages = stage2(args.quick, args.cache_dir)
    out = {"quick": args.quick, "stage2": stages["qa_after_stage2"]}
    for row in ("scale_ffn_routed", "scale_ffn_routed+samples"):  # the full-width rows read the same stream
        torch.manual_seed(s.seed + 5)
        model = prepare_method("scale_ffn_routed", copy.deepcopy(base), e.row_sizes(row))
        report = e.fit_router(model, row, base)
        model.eval()
        generator = torch.Generator().manual_seed(s.seed)  # fit_router's split: the new side first, then the old
        fitted = {"task1": set(_split_sequences(len(e.task1_qa), generator)[0])}
        fitted["task0"] = set(_split_sequences(len(e.task0_qa), generator)[0]) if row == "scale_ffn_routed" else set()
        threshold = report["threshold"]
        result = {"report": {k: report[k] for k in ("old_side", "old_to_base", "new_to_expansion", "threshold")}}
        for task in ("task0", "task1"):
            es = e.eval_sets[task]
            with torch.no_grad():
                model(input_ids=es.input_ids, attention_mask=es.attention_mask)
            score = model.base_model.last_routing.scores
            in_fit = torch.tensor([i in fitted[task] for i in range(len(es.input_ids))])[:, None].expand_as(score)
            per = {}
            for index, role in enumerate(TOKEN_ROLES):
                for part, where in (("fitted", in_fit), ("not_fitted", ~in_fit)):
                    mask = (es.roles == index + 1) & where
                    if mask.any():
                        per[f"{role}/{part}"] = shares(score, mask, threshold)
            first = torch.zeros_like(score, dtype=torch.bool)
            first[torch.arange(len(es.input_ids)), es.answer_start - 1] = True  # the ':' predicting the answer
            per["first_answer_position"] = shares(score, first, threshold)
            result[task] = per
        out[row] = result
    words = [e.tokenizer.convert_ids_to_tokens(ids.tolist()) for ids in e.base_samples(base)]
    out["samples"] = {
        "count": len(words), "length": len(words[0]),
        "with_Answer_token": sum("Answer" in w for w in words), "with_question_mark": sum("?" in w for w in words),
        "third_token": collections.Counter(w[2] for w in words).most_common(5),
        "first_eight": [" ".join(w) for w in words[:8]],
    }
    write_json(args.output_dir / "diagnose_router.json", out)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
