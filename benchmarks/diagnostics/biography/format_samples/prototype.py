"""Prototype: the old side sampled from the base model in the new data's format (nothing trained but the router).

    python benchmarks/diagnostics/biography/format_samples/prototype.py CACHE_DIR [--copies N --dedupe --unique ...]
"""
import collections, copy, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))
from benchmarks.biography.run import Experiment, Settings, pretrain_or_load, ROUTER_BATCH
from benchmarks.biography.train import encode_qa
from benchmarks.methods import prepare_method, fit_method_router


@torch.no_grad()
def sample_in_format(model, sequences, vocab, format_share, slot_typing, seed, batch=64):
    n = len(sequences)
    df = collections.Counter()
    for s in sequences:
        df.update(set(s.tolist()))
    fmt = {t for t, c in df.items() if c >= format_share * n}
    follow = collections.defaultdict(set)
    for s in sequences:
        s = s.tolist()
        for t in range(1, len(s)):
            if s[t] not in fmt and s[t - 1] in fmt:
                follow[s[t - 1]].add(s[t])
    content = torch.ones(vocab, dtype=torch.bool)
    content[list(fmt)] = False
    g = torch.Generator().manual_seed(seed)
    out, confidence = [], []
    for start in range(0, n, batch):
        rows = sequences[start:start + batch]
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        lengths = [len(r) for r in rows]
        logp = [[] for _ in rows]
        for t in range(1, L):
            need = [i for i, r in enumerate(rows) if t < len(r) and int(r[t]) not in fmt]
            if not need:
                continue
            logits = model(input_ids=ids[need, :t]).logits[:, -1].float()
            for j, i in enumerate(need):
                allowed = content.clone()
                prev = int(ids[i, t - 1])
                if slot_typing and prev in fmt and follow[prev]:
                    allowed = torch.zeros(vocab, dtype=torch.bool)
                    allowed[list(follow[prev])] = True
                lg = logits[j].masked_fill(~allowed, float("-inf"))
                pr = torch.softmax(lg, -1)
                ids[i, t] = torch.multinomial(pr, 1, generator=g)
                logp[i].append(float(pr[ids[i, t]].log()))
        out.extend(ids[i, :lengths[i]].clone() for i in range(len(rows)))
        confidence.extend(sum(l) / len(l) for l in logp)
    return out, fmt, confidence


def main(cache, format_share=0.05, slot_typing=True, copies=1, calibrate_on="held_out", max_old_error=0.01, keep_share=1.0, dedupe=False, unique=False):
    s = Settings.full()
    e = Experiment(s, torch.device("cpu"), "fp32")
    base, _ = pretrain_or_load(e, cache, print)
    base.eval()
    tok = e.tokenizer
    new = [torch.tensor(encode_qa(tok, p)["input_ids"]) for p in e.task1_qa]
    t0 = time.time()
    old, fmt, conf = [], None, []
    for c in range(copies):
        o, fmt, cf = sample_in_format(base, new, len(tok), format_share, slot_typing, s.seed + c)
        old += o; conf += cf
    if dedupe:
        colon_ = tok.convert_tokens_to_ids(":")
        newp = {tuple(x.tolist()[: x.tolist().index(colon_) + 1]) for x in new}
        keepi = [i for i, o in enumerate(old) if tuple(o.tolist()[: o.tolist().index(colon_) + 1]) not in newp]
        old = [old[i] for i in keepi]; conf = [conf[i] for i in keepi]; newx0 = [(new * copies)[i] for i in keepi]
    else:
        newx0 = new * copies
    if unique:
        seen, ki = set(), []
        for i, o in enumerate(old):
            k = tuple(o.tolist())
            if k not in seen:
                seen.add(k); ki.append(i)
        old = [old[i] for i in ki]; conf = [conf[i] for i in ki]; newx0 = [newx0[i] for i in ki]
    order = sorted(range(len(old)), key=lambda i: -conf[i])
    keep = sorted(order[: int(len(old) * keep_share)])
    old = [old[i] for i in keep]; newx = [newx0[i] for i in keep]
    sample_s = time.time() - t0
    task0_names = {tuple(tok(p.name, add_special_tokens=False)["input_ids"]) for p in e.task0}
    task1_names = {tuple(tok(p.name, add_special_tokens=False)["input_ids"]) for p in e.task1}
    stats = collections.Counter()
    for o, x in zip(old, newx):
        w = o.tolist()
        # the name slot: the first two content tokens in new x
        pos = [t for t in range(len(w)) if int(x[t]) not in fmt]
        nm = tuple(w[pos[0]:pos[0] + 2]) if len(pos) >= 2 else ()
        stats["task0_name"] += nm in task0_names
        stats["task1_name"] += nm in task1_names
    examples = [" ".join(tok.convert_ids_to_tokens(o.tolist())) for o in old[:12]]
    torch.manual_seed(s.seed + 5)
    model = prepare_method("scale_ffn_routed", copy.deepcopy(base), e.row_sizes("scale_ffn_routed"))
    report = fit_method_router(model, e.new_data(), [o for o in old], batch_size=ROUTER_BATCH, seed=s.seed,
                               calibrate_on=calibrate_on, max_old_error=max_old_error)
    model.eval()
    res = {"unique": unique, "dedupe": dedupe, "keep_share": keep_share, "format_share": format_share, "slot_typing": slot_typing, "copies": copies, "calibrate_on": calibrate_on,
           "max_old_error": max_old_error, "format_tokens": sorted(tok.convert_ids_to_tokens(sorted(fmt))),
           "sample_s": round(sample_s, 1), "samples": len(old), "name_slot_task0_full_name": stats["task0_name"] / len(old),
           "name_slot_task1_full_name": stats["task1_name"] / len(old), "examples": examples,
           "report": {k: report.__dict__[k] for k in ("old_to_base", "new_to_expansion", "threshold", "fitted_new_to_expansion")}}
    colon = tok.convert_tokens_to_ids(":")
    torch.save(old, Path("/tmp") / f"old_{copies}_{keep_share}_{slot_typing}.pt")
    for task in ("task0", "task1"):
        es = e.eval_sets[task]
        with torch.no_grad():
            model(input_ids=es.input_ids, attention_mask=es.attention_mask)
        sc = model.base_model.last_routing.scores
        thr = report.threshold
        first = sc[torch.arange(len(es.input_ids)), es.answer_start - 1]
        exp = (sc >= thr) & es.attention_mask.bool()
        prompts = {tuple(o.tolist()[: o.tolist().index(colon) + 1]) for o in old if colon in o.tolist()}
        cov = torch.tensor([tuple(es.input_ids[i, : es.answer_start[i]].tolist()) in prompts for i in range(len(es.input_ids))])
        fe = first >= thr
        res[task + "_coverage"] = {"covered": float(cov.float().mean()),
            "first_to_expansion_covered": float(fe[cov].float().mean()) if cov.any() else None,
            "first_to_expansion_uncovered": float(fe[~cov].float().mean()) if (~cov).any() else None}
        res[task] = {"first_answer_to_expansion": float((first >= thr).float().mean()),
                     "tokens_to_expansion": float(exp.sum() / es.attention_mask.sum()),
                     "questions_wholly_on_base": float((~exp.any(1)).float().mean())}
    print(json.dumps({k: v for k, v in res.items() if k != "format_tokens"}, indent=1))
    return res


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("cache"); p.add_argument("--format-share", type=float, default=0.05)
    p.add_argument("--no-slot-typing", action="store_true"); p.add_argument("--copies", type=int, default=1)
    p.add_argument("--calibrate-on", default="held_out"); p.add_argument("--max-old-error", type=float, default=0.01)
    p.add_argument("--dedupe", action="store_true"); p.add_argument("--unique", action="store_true"); p.add_argument("--out"); p.add_argument("--keep-share", type=float, default=1.0)
    a = p.parse_args()
    r = main(a.cache, a.format_share, not a.no_slot_typing, a.copies, a.calibrate_on, a.max_old_error, a.keep_share, a.dedupe, a.unique)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1))
