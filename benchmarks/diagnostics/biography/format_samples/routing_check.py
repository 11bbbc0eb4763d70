"""Routing shares of fit_router with the old side drawn in the new data's format (``BaseModelSamples(
in_new_data_format=True)``) on the biographies (no stage 3), for the sampler's options (findings.md, "Routing only,
19,200 draws": the ``format_share`` / ``max_old_error`` the ``+format`` rows use).

    python benchmarks/diagnostics/biography/format_samples/routing_check.py OUT.json --cache-dir CACHE_DIR \
        [--format-share 0.05] [--min-p 0] [--max-old-error 0.01]
    python benchmarks/diagnostics/biography/format_samples/routing_check.py OUT.json --quick

CACHE_DIR: run.py's --cache-dir (the stage-2 model of the full settings; without it stages 1-2 are run, and cached
there when given). The router is fitted as the ``scale_ffn_routed+format`` row fits it (FFN adapter, its
``RouterConfig``, ``Settings.router_format_samples`` draws, seed 0), with ``--format-share`` and ``--max-old-error``
over the row's. ``--min-p`` (a diagnostic, not in the library): keep only the draws whose last content run starts
with a token the base model gave at least that probability (it was sure of the answer). Prints and writes: the
threshold, the draws kept and what they are (exact Task-0 questions; with a Task-0 / Task-1 full name), and the
share of the evaluated questions' first-answer positions sent to the expansion. ``--quick``
(``tests/benchmarks/test_diagnostics.py``): ``Settings.quick()`` (stages 1-2 a few steps, 40 draws); its numbers mean
nothing.
"""
import argparse, copy, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.biography.run import ROUTER_BATCH  # noqa: E402
from benchmarks.biography.train import encode_qa  # noqa: E402
from benchmarks.continual_pretraining.run import write_json  # noqa: E402
from benchmarks.diagnostics.biography.stage2 import stage2  # noqa: E402
from benchmarks.methods import prepare_method  # noqa: E402
from peft_scale import BaseModelSamples, fit_router, router_fitting  # noqa: E402
from peft_scale.format_sampling import _prefix_before_last_run, format_tokens  # noqa: E402

ROW = "scale_ffn_routed+format"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON to write")
    parser.add_argument("--cache-dir", default=None, help="run.py's --cache-dir (the stage-2 model)")
    parser.add_argument("--quick", action="store_true", help="smoke test: Settings.quick()")
    parser.add_argument("--format-share", type=float, default=0.05)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-old-error", type=float, default=0.01)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Fit the router, route the evaluated questions; writes and returns the shares."""
    args = parse_args(argv)
    s, e, base, _ = stage2(args.quick, args.cache_dir)
    torch.manual_seed(s.seed + 5)
    model = prepare_method("scale_ffn_routed", copy.deepcopy(base), e.row_sizes(ROW))
    captured, original = [], router_fitting.sample_in_format

    def sample_and_filter(sampler_model, new, *rest):
        drawn = original(sampler_model, new, *rest)
        formats, kept = format_tokens(new, rest[1]), []  # rest: num_samples, format_share, batch_size, seed, progress
        with torch.no_grad():
            for sample in drawn:
                ids = sample.tolist()
                start = len(_prefix_before_last_run(ids, formats))  # the last run's first token
                p = torch.softmax(sampler_model(input_ids=sample[None]).logits[0, start - 1].float(), -1)[ids[start]]
                if p >= args.min_p:
                    kept.append(sample)
        captured.extend(kept)
        return kept

    samples = BaseModelSamples(count=s.router_format_samples, in_new_data_format=True, format_share=args.format_share,
                               batch_size=ROUTER_BATCH)  # fmt: skip
    router_fitting.sample_in_format = sample_and_filter
    begin = time.time()
    try:
        report = fit_router(model, e.new_data(), samples, max_old_error=args.max_old_error, progress=False)
    finally:
        router_fitting.sample_in_format = original
    tok = e.tokenizer
    questions = {tuple(encode_qa(tok, pair)["input_ids"]) for pair in e.task0_qa}
    names = lambda people: {tuple(tok.convert_tokens_to_ids(p.name.split())) for p in people}  # noqa: E731
    named0, named1 = names(e.task0), names(e.task1)
    has = lambda ids, pool: any(tuple(ids[i:i + 2]) in pool for i in range(len(ids) - 1))  # noqa: E731
    keys = [x.tolist() for x in captured]
    out = {"quick": args.quick, "format_share": args.format_share, "min_p": args.min_p,
           "max_old_error": args.max_old_error, "draws": s.router_format_samples, "fit_s": time.time() - begin,
           "threshold": report.threshold, "kept": len(keys),
           "old_to_base": report.old_to_base, "new_to_expansion": report.new_to_expansion,
           "exact_task0_questions": sum(tuple(k) in questions for k in keys),
           "task0_name": sum(has(k, named0) for k in keys), "task1_name": sum(has(k, named1) for k in keys)}  # fmt: skip
    model.eval()
    for task in ("task0", "task1"):
        es = e.eval_sets[task]
        with torch.no_grad():
            model(input_ids=es.input_ids, attention_mask=es.attention_mask)
        scores = model.base_model.last_routing.scores
        first = scores[torch.arange(len(es.input_ids)), es.answer_start - 1]
        out[task + "_first_answer_to_expansion"] = float((first >= report.threshold).float().mean())
    print(json.dumps(out))
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
