"""Check of the library code: fit_router(sample_format="new_data") on the biographies, routing shares only.

    python benchmarks/diagnostics/biography/format_samples/library_check.py CACHE_DIR   # run.py's --cache-dir
"""
import copy, json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))
from benchmarks.biography.run import Experiment, Settings, pretrain_or_load, ROUTER_BATCH
from benchmarks.methods import prepare_method
from peft_scale import fit_router
s = Settings.full(); e = Experiment(s, torch.device("cpu"), "fp32")
base, _ = pretrain_or_load(e, sys.argv[1], print); base.eval()
torch.manual_seed(s.seed + 5)
model = prepare_method("scale_ffn_routed", copy.deepcopy(base), e.row_sizes("scale_ffn_routed"))
t = time.time()
rep = fit_router(model, e.new_data(), None, sample_format="new_data", num_samples=32 * 600, batch_size=ROUTER_BATCH, seed=s.seed, progress=False)
print(rep); print("fit_s", time.time() - t)
model.eval(); out = {"fit_s": time.time() - t, "threshold": rep.threshold, "tokens": rep.tokens}
for task in ("task0", "task1"):
    es = e.eval_sets[task]
    with torch.no_grad(): model(input_ids=es.input_ids, attention_mask=es.attention_mask)
    sc = model.base_model.last_routing.scores
    first = sc[torch.arange(len(es.input_ids)), es.answer_start - 1]
    out[task + "_first_answer_to_expansion"] = float((first >= rep.threshold).float().mean())
print(json.dumps(out))
