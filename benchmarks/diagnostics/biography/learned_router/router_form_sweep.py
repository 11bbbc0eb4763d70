"""Diagnostic (findings.md, "second pass"): which router form generalises from the Task-1 / Task-0 questions it was
fitted on to the others? Nothing here is trained beyond the routers; no stage-3 run.

For each form (layer whose input it reads, hidden width, weight decay, steps), a router is trained exactly as
fit_router's trial router is (its split, 60% of each side's sequences, seed 0), the threshold set as fit_router sets
it (at most 1% of the calibration part's old tokens at or above it), and the first-answer positions (the ':' that
predicts the first answer token) are routed: on the fitted sequences and on the held-out 20%, at the calibrated
threshold and at 0.5.

    python benchmarks/diagnostics/biography/learned_router/router_form_sweep.py CACHE_DIR   # run.py's --cache-dir

Writes router_form_sweep.json in benchmarks/results/biography/learned_router/. Four forms were measured (the run was
stopped there to free the CPU).
"""
import copy, sys, time, math, json
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
# where its JSON goes: the results of the run it diagnoses
RESULTS = Path(__file__).resolve().parents[4] / "benchmarks" / "results" / "biography" / "learned_router"
from transformers import AutoModelForCausalLM
from benchmarks.biography.run import Experiment, Settings
from peft_scale.token_router import TokenRouter
from peft_scale.router_fitting import layer_inputs, _train_router, _split_sequences

s = Settings.full()
e = Experiment(s, torch.device("cpu"), "fp32")
(model_dir,) = [p for p in Path(sys.argv[1]).iterdir() if (p / "report.json").exists()]
base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
def seqs_of(es):
    return [es.input_ids[i][es.attention_mask[i].bool()] for i in range(len(es.input_ids))]
seqs = {"new": seqs_of(e.eval_sets["task1"]), "old": seqs_of(e.eval_sets["task0"])}
ES = {"new": e.eval_sets["task1"], "old": e.eval_sets["task0"]}
d = base.config.hidden_size
feats = {}
for L in (1, 2, 3):
    layer = base.model.layers[L]
    feats[L] = {k: layer_inputs(base, layer, d, v, 64) for k, v in seqs.items()}
g = torch.Generator().manual_seed(0)
spl = {"new": _split_sequences(len(seqs["new"]), g), "old": _split_sequences(len(seqs["old"]), g)}
def first_scores(sc, side, idx):
    es = ES[side]
    return torch.stack([sc[i][es.answer_start[i] - 1] for i in idx])
configs = [dict(L=2, h=256, wd=1e-4, steps=300), dict(L=3, h=256, wd=1e-4, steps=300), dict(L=2, h=1024, wd=1e-4, steps=300),
           dict(L=2, h=256, wd=1e-2, steps=300)]
out = []
for c in configs:
    t = time.time()
    F = feats[c["L"]]
    router = TokenRouter(d, c["h"])
    p = _train_router(router, torch.cat([F["new"][i] for i in spl["new"][0]]), torch.cat([F["old"][i] for i in spl["old"][0]]), c["steps"], 1e-2, c["wd"], 0)
    sc = {k: [torch.sigmoid(router.logits(x, p)) for x in v] for k, v in F.items()}
    cal = torch.cat([sc["old"][i] for i in spl["old"][1]])
    hi = cal.sort(descending=True).values; allowed = math.floor(0.01 * len(cal)); thr = max(0.5, float(hi[allowed]) + 1e-7)
    r = dict(c, thr=round(thr, 4))
    for part, j in (("fit", 0), ("held", 2)):
        r[f"{part} T1 first->exp"] = round(float((first_scores(sc["new"], "new", spl["new"][j]) >= thr).float().mean()), 3)
        r[f"{part} T0 first->base"] = round(float((first_scores(sc["old"], "old", spl["old"][j]) < thr).float().mean()), 3)
        r[f"{part} T1 first->exp@0.5"] = round(float((first_scores(sc["new"], "new", spl["new"][j]) >= 0.5).float().mean()), 3)
        r[f"{part} T0 first->base@0.5"] = round(float((first_scores(sc["old"], "old", spl["old"][j]) < 0.5).float().mean()), 3)
    r["s"] = round(time.time() - t)
    print(json.dumps(r), flush=True); out.append(r)
(RESULTS / "router_form_sweep.json").write_text(json.dumps(out, indent=1))
