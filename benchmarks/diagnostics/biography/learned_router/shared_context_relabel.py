"""Diagnostic (findings.md, "second pass"): tokens whose whole context occurs on both sides, relabelled as old, and
a cross-fitted threshold. Routing shares on the Task-0 / Task-1 QA only; nothing is trained but routers.

A token whose prefix (every token up to it, from the start) occurs in an old sequence has exactly the stream of an
old token (the same causal prefix at the same positions): here the template words before the name, and first
names from the shared pool (41% of the tokens of each side). Variants, with fit_router's trial split and seed:
  1. as fit_router fits (no relabelling);
  2. those new tokens moved to the old side, and the threshold set on the old tokens that are not shared;
  3. as 2, with the threshold from 5-fold cross-fitted scores of every old sequence, a router then fitted on all
     sequences, and the threshold also set on that router's own (in-sample) old scores.

    python benchmarks/diagnostics/biography/learned_router/shared_context_relabel.py CACHE_DIR   # run.py's --cache-dir
"""
import copy, json, sys, time, math
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
# where its JSON goes: the results of the run it diagnoses
RESULTS = Path(__file__).resolve().parents[4] / "benchmarks" / "results" / "biography" / "learned_router"
from transformers import AutoModelForCausalLM
from benchmarks.biography.run import Experiment, Settings
from benchmarks.methods import prepare_method
from peft_scale.router_fitting import layer_inputs, _train_router, _split_sequences, token_sequences, _adapters_disabled

s = Settings.full()
e = Experiment(s, torch.device("cpu"), "fp32")
(model_dir,) = [p for p in Path(sys.argv[1]).iterdir() if (p / "report.json").exists()]
base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
torch.manual_seed(s.seed + 5)
model = prepare_method("scale_ffn_routed", copy.deepcopy(base), e.row_sizes("scale_ffn_routed"))
sm = model.base_model
name = "default"
router = sm.scale_router[name]
layer = sm.router_layer(name)

def seqs_of(es):
    return [es.input_ids[i][es.attention_mask[i].bool()] for i in range(len(es.input_ids))]
new_seqs = seqs_of(e.eval_sets["task1"]); old_seqs = seqs_of(e.eval_sets["task0"])
with _adapters_disabled(sm):
    F = {"new": layer_inputs(sm.model, layer, router.features, new_seqs, 64), "old": layer_inputs(sm.model, layer, router.features, old_seqs, 64)}
print("tokens", {k: sum(len(x) for x in v) for k, v in F.items()})

def prefix_keys(seqs):
    out = []
    for ids in seqs:
        h, keys = 0, []
        for t in ids.tolist():
            h = hash((h, t)); keys.append(h)
        out.append(keys)
    return out
K = {"new": prefix_keys(new_seqs), "old": prefix_keys(old_seqs)}
oldset = {k for ks in K["old"] for k in ks}; newset = {k for ks in K["new"] for k in ks}
shared = {"new": [torch.tensor([k in oldset for k in ks]) for ks in K["new"]],
          "old": [torch.tensor([k in newset for k in ks]) for ks in K["old"]]}
print("shared share", {k: float(torch.cat(v).float().mean()) for k, v in shared.items()})

def metrics(score_new, score_old, thr):
    out = {}
    for task, es, sc in (("T0", e.eval_sets["task0"], score_old), ("T1", e.eval_sets["task1"], score_new)):
        first = torch.stack([sc[i][es.answer_start[i] - 1] for i in range(len(sc))])
        ans = torch.cat([sc[i][es.answer_start[i] - 1: es.answer_start[i] - 1 + es.answer_length[i]] for i in range(len(sc))])
        allb = torch.tensor([bool((x < thr).all()) for x in sc]).float().mean()
        if task == "T0":
            out["T0 first->base"] = float((first < thr).float().mean()); out["T0 ans->base"] = float((ans < thr).float().mean()); out["T0 all-base"] = float(allb)
        else:
            out["T1 first->exp"] = float((first >= thr).float().mean()); out["T1 ans->exp"] = float((ans >= thr).float().mean())
    return {k: round(v, 3) for k, v in out.items()}

def threshold(old_scores, max_err=0.01):
    allowed = math.floor(max_err * len(old_scores)); hi = old_scores.sort(descending=True).values
    return max(0.5, float(hi[allowed]) + 1e-7) if allowed < len(hi) else 0.5

def fit(new_idx, old_idx, relabel, steps=300, lr=1e-2, wd=1e-4, seed=0):
    nf = [F["new"][i] for i in new_idx]; of = [F["old"][i] for i in old_idx]
    if relabel:
        moved = [F["new"][i][shared["new"][i]] for i in new_idx]
        nf = [F["new"][i][~shared["new"][i]] for i in new_idx]; of = of + moved
    return _train_router(router, torch.cat(nf), torch.cat(of), steps, lr, wd, seed)

def score(params, side):
    return [torch.sigmoid(router.logits(x, params)) for x in F[side]]

g = torch.Generator().manual_seed(0)
spl = {"new": _split_sequences(len(new_seqs), g), "old": _split_sequences(len(old_seqs), g)}
variant = sys.argv[1] if len(sys.argv) > 1 else "all"
results = {}
for relabel in (False, True):
    t = time.time()
    p = fit(spl["new"][0], spl["old"][0], relabel)
    so, sn = score(p, "old"), score(p, "new")
    cal = torch.cat([so[i][~shared["old"][i]] if relabel else so[i] for i in spl["old"][1]])
    thr = threshold(cal)
    results[f"split relabel={relabel}"] = (round(thr, 4), metrics(sn, so, thr), round(time.time() - t, 1))
    print(results[f"split relabel={relabel}"], flush=True)
# cross-fitting
for relabel in (True,):
    for folds in (5,):
        t = time.time()
        oof = {"new": [None] * len(new_seqs), "old": [None] * len(old_seqs)}
        gg = torch.Generator().manual_seed(0)
        perm = {k: torch.randperm(len(F[k]), generator=gg).tolist() for k in F}
        for f in range(folds):
            hold = {k: set(perm[k][f::folds]) for k in F}
            p = fit([i for i in range(len(new_seqs)) if i not in hold["new"]], [i for i in range(len(old_seqs)) if i not in hold["old"]], relabel)
            for k in F:
                for i in hold[k]:
                    oof[k][i] = torch.sigmoid(router.logits(F[k][i], p))
        cal = torch.cat([oof["old"][i][~shared["old"][i]] for i in range(len(old_seqs))])
        thr = threshold(cal)
        pf = fit(range(len(new_seqs)), range(len(old_seqs)), relabel)
        so, sn = score(pf, "old"), score(pf, "new")
        insample_thr = threshold(torch.cat([so[i][~shared["old"][i]] for i in range(len(old_seqs))]))
        results[f"crossfit{folds} relabel={relabel}"] = (round(thr, 4), "oof metrics", metrics(oof["new"], oof["old"], thr), "final in-sample", metrics(sn, so, thr), "insample thr", round(insample_thr, 4), metrics(sn, so, insample_thr), round(time.time() - t, 1))
        print(results[f"crossfit{folds} relabel={relabel}"], flush=True)
(RESULTS / "shared_context_relabel.json").write_text(json.dumps(results, indent=1))
