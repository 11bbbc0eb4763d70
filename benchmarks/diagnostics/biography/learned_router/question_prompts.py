"""Diagnostic (findings.md, "Why (b) misses both"): can prompts make the stage-2 model write Task-0 questions?

The (b) rows sample the base model from ``<s>`` and the first word of each Task-1 question; it writes biography
fragments, not questions. Here each Task-1 question is cut just before the person's name (``<s> What is the birth
date of``, ``<s> Where was``, ...), and the stage-2 model continues it once, as ``fit_router`` samples (temperature 1,
the rows' sample length). Per question template: the share of samples whose next two words are a Task-0 person's
full name, any first name, and the share that go on to ``? Answer :`` after it (what a Task-0 question needs).
Nothing is trained.

    python benchmarks/diagnostics/biography/learned_router/question_prompts.py CACHE_DIR   # run.py's --cache-dir

Writes question_prompts.json in benchmarks/results/biography/learned_router/ (``--output-dir``: elsewhere).
``--quick`` (``tests/benchmarks/test_diagnostics.py``): ``Settings.quick()``; its numbers mean nothing.
"""
import collections, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
# where its JSON goes: the results of the run it diagnoses
RESULTS = Path(__file__).resolve().parents[4] / "benchmarks" / "results" / "biography" / "learned_router"
from benchmarks.biography.data import FIRST_NAMES  # noqa: E402
from benchmarks.biography.train import encode_qa  # noqa: E402
from benchmarks.continual_pretraining.run import write_json  # noqa: E402
from benchmarks.diagnostics.biography.stage2 import parse_args, stage2  # noqa: E402
from peft_scale.router_fitting import sample_base_model  # noqa: E402


def main(argv=None) -> dict:
    """The samples' shares per question template; writes question_prompts.json (and returns it)."""
    args = parse_args(__doc__, RESULTS, argv)
    s, e, base, stages = stage2(args.quick, args.cache_dir)  # the cached stage-2 model (or stages 1-2 run and cached)
    tok = e.tokenizer
    first_names = set(tok.convert_tokens_to_ids(FIRST_NAMES))
    task0_names = {tuple(tok(p.name, add_special_tokens=False)["input_ids"]) for p in e.task0}
    question_tail = tok.convert_tokens_to_ids(["?", "Answer", ":"])

    by_template = collections.defaultdict(list)
    for pair in e.task1_qa:
        ids = encode_qa(tok, pair)["input_ids"]
        cut = next(i for i, t in enumerate(ids) if t in first_names)  # the name's first word
        by_template[tuple(ids[:cut])].append(ids[:cut])

    out = {"quick": args.quick, "qa_after_stage2": stages["qa_after_stage2"], "sample_length": e.sample_length,
           "templates": {}}  # fmt: skip
    for prefix, prompts in by_template.items():
        samples = sample_base_model(base, torch.tensor(prompts), len(prompts), e.sample_length, 64, s.seed, progress=False)
        n = len(prefix)
        name = [tuple(x[n:n + 2].tolist()) for x in samples]
        known = [nm in task0_names for nm in name]
        asks = [k and x[n + 2:n + 5].tolist() == question_tail for k, x in zip(known, samples)]
        text = " ".join(tok.convert_ids_to_tokens(list(prefix)))
        out["templates"][text] = {
            "samples": len(samples),
            "first_name_next": sum(nm[0] in first_names for nm in name) / len(samples),
            "task0_full_name_next": sum(known) / len(samples),
            "task0_name_then_question_mark_answer": sum(asks) / len(samples),
            "examples": [" ".join(tok.convert_ids_to_tokens(x.tolist())) for x in samples[:3]],
        }
        print(text, {k: v for k, v in out["templates"][text].items() if k != "examples"})
    write_json(args.output_dir / "question_prompts.json", out)
    return out


if __name__ == "__main__":
    main()
