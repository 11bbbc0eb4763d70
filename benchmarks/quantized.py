"""SCALE-FFN against LoRA of the same trainable size on a 4-bit (QLoRA-style) base: training memory and step time,
and how an adapter trained on the 4-bit base behaves on the full-precision one.

Run from the repository root::

    PYTHONPATH=. python benchmarks/quantized.py --model smollm2   # the bundled SmolLM2-135M in nf4 (~10 min, 1 thread)
    PYTHONPATH=. python benchmarks/quantized.py --model tiny      # random weights, throughput.py's tiny shapes
    PYTHONPATH=. python benchmarks/quantized.py --quick           # seconds: smoke run

The base is saved in fp32 and loaded as a user loads a large model,
``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``,
then ``prepare_model_for_kbit_training`` (``--gradient-checkpointing`` to turn that on too). Rows, each on its own
copy of the same quantized base, timed with ``benchmarks/throughput.py``'s ``bench_training`` (forward with labels +
backward + fused AdamW step; median of ``repeats`` after ``warmup``; memory: on CUDA the allocator's peak, on a
CPU the accounting estimate ``est_peak_mib`` = parameters + gradients + AdamW state + saved activations):

- ``lora``: LoRA on gate/up/down, the rank whose trainable count is nearest SCALE-FFN's.
- ``scale_ffn``: ``ScaleConfig(ffn_expansion=k)``, ``k`` ~10% of the FFN (``throughput.expansion_sizes``).

Goal (issue 14): ``scale_ffn / lora <= 1.05`` in memory and in step time.

Transfer (2 steps in ``--quick``, none with ``--transfer-steps 0``): SCALE-FFN trained ``--transfer-steps`` AdamW
steps (lr 1e-3) on the nf4 base (SmolLM2: Spanish Wikipedia summaries; random models: random ids), saved, and loaded
onto the fp32 base. On held-out text: the logits of the fp32 and nf4 bases, and of the adapter on each, compared (max
and mean |difference|), and each model's loss.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.throughput import (  # noqa: E402
    WORKLOADS,
    bench_training,
    build_base,
    count_trainable,
    expansion_sizes,
    lora_model,
    machine_info,
    precision_context,
    scale_model,
    write_result,
)

OUTPUT_DIR = REPO / "benchmarks" / "results"
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
GOAL = 1.05


def load(folder: str, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(**NF4) if quantized else None
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu").eval()


def training_rows(base, ids, sizes: dict, workload: dict, gradient_checkpointing: bool, log) -> tuple[dict, int]:
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    precision = precision_context(ids.device, torch.float32)
    scale = scale_model(base, ffn_expansion=sizes["ffn_expansion"])
    lora, rank = lora_model(base, count_trainable(scale))
    rows = {}
    for name, model in (("lora", lora), ("scale_ffn", scale)):
        torch.manual_seed(0)
        rows[name] = bench_training(model, ids, workload["warmup"], workload["repeats"], precision)
        row = rows[name]
        log(f"  train {name:<10} {row['median_s'] * 1e3:9.1f} ms  {row['memory']['est_peak_mib']:8.1f} MiB")
    return rows, rank


def text_batches(model_name: str, vocab: int, batch: int, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch x seq`` tokens: Spanish Wikipedia for SmolLM2, random ids otherwise."""
    if model_name != "smollm2":
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(3, vocab, (batch, seq), generator=generator) for _ in range(count)]
    sys.path.insert(0, str(REPO / "examples"))
    from bundled import load_smollm2_tokenizer, wiki_summaries

    tokenizer = load_smollm2_tokenizer()
    stream = tokenizer("\n\n".join(wiki_summaries("es")[seed * 400 : (seed + 1) * 400]))["input_ids"]
    blocks = torch.tensor(stream[: count * batch * seq]).view(count, batch, seq)
    return list(blocks)


def transfer(folder: str, model_name: str, sizes: dict, workload: dict, steps: int, log) -> dict:
    """Train SCALE-FFN on the nf4 base, load the adapter onto the fp32 base, compare on held-out text."""
    from peft import PeftModel

    batch, seq = workload["batch"], workload["seq"]
    quantized = load(folder, True)
    vocab = quantized.config.vocab_size
    train_batches = text_batches(model_name, vocab, batch, seq, steps, seed=0)
    held_out = text_batches(model_name, vocab, batch, seq, 1, seed=1)[0]
    model = scale_model(quantized, ffn_expansion=sizes["ffn_expansion"]).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, ids in enumerate(train_batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        log(f"  transfer step {step}: loss {loss.item():.3f}")
    with tempfile.TemporaryDirectory() as adapter:
        model.save_pretrained(adapter)
        on_full = PeftModel.from_pretrained(load(folder, False), adapter)

    def run(m):
        with torch.no_grad():
            out = m.eval()(input_ids=held_out, labels=held_out)
        return out.logits, out.loss.item()

    (q_base, q_base_loss), (fp_base, fp_base_loss) = run(load(folder, True)), run(load(folder, False))
    (q_scale, q_scale_loss), (fp_scale, fp_scale_loss) = run(model), run(on_full)

    def diff(a, b):
        d = (a - b).abs()
        return dict(max=d.max().item(), mean=d.mean().item())

    return dict(
        steps=steps, lr=1e-3, logit_std=fp_base.std().item(),
        loss=dict(nf4_base=q_base_loss, fp32_base=fp_base_loss, nf4_scale=q_scale_loss, fp32_scale=fp_scale_loss),
        bases_fp32_vs_nf4=diff(fp_base, q_base), adapted_fp32_vs_nf4=diff(fp_scale, q_scale),
        effect_on_nf4=diff(q_scale, q_base), effect_fp32_vs_nf4=diff(fp_scale - fp_base, q_scale - q_base),
    )


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"\n== {result['model']} in nf4 | cpu | fp32 compute | batch {w['batch']} x seq {w['seq']} | warmup "
        f"{w['warmup']}, repeats {w['repeats']} | gradient checkpointing {result['gradient_checkpointing']} ==",
        f"{'training step':<14}{'median ms [min-max]':>28}{'trainable':>12}{'est_peak_mib':>14}",
    ]
    for name, row in result["training"].items():
        times = f"{row['median_s'] * 1e3:.1f} [{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}]"
        lines.append(f"{name:<14}{times:>28}{row['trainable_params']:>12,}{row['memory']['est_peak_mib']:>14.1f}")
    lines.append(f"(LoRA rank {result['lora_rank']}, SCALE ffn_expansion {result['sizes']['ffn_expansion']})")
    for name, value in result["ratios"].items():
        lines.append(f"{name}: {value:.3f} (goal <= {GOAL}: {'met' if value <= GOAL else 'MISSED'})")
    if result.get("transfer"):
        t = result["transfer"]
        lines.append(f"\ntransfer: SCALE-FFN trained {t['steps']} steps on nf4, loaded on fp32 (held-out batch; "
                     f"logit std {t['logit_std']:.2f})")
        for key in ("bases_fp32_vs_nf4", "adapted_fp32_vs_nf4", "effect_on_nf4", "effect_fp32_vs_nf4"):
            lines.append(f"  |logits| {key:<20} max {t[key]['max']:.4f}  mean {t[key]['mean']:.4f}")
        lines.append("  loss " + ", ".join(f"{k} {v:.4f}" for k, v in t["loss"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, the 'quick' workload")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--transfer-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    model_name = "tiny_quick" if args.quick else args.model
    workload = dict(WORKLOADS["quick" if args.quick else args.model])
    with tempfile.TemporaryDirectory() as folder:
        build_base(model_name, torch.float32, seed=0).save_pretrained(folder)
        base = load(folder, True)
        sizes = expansion_sizes(base.config)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, base.config.vocab_size, (workload["batch"], workload["seq"]), generator=generator)
        training, rank = training_rows(base, ids, sizes, workload, args.gradient_checkpointing, log)
        del base
        steps = min(args.transfer_steps, 2) if args.quick else args.transfer_steps
        moved = transfer(folder, model_name, sizes, workload, steps, log) if steps else None
    result = dict(
        model=args.model + (" (quick)" if args.quick else ""), quantization=dict(NF4, bnb_4bit_compute_dtype="float32"),
        date=_dt.datetime.now().isoformat(timespec="seconds"), argv=list(sys.argv[1:] if argv is None else argv),
        machine=dict(machine_info(torch.device("cpu")), bitsandbytes=importlib.metadata.version("bitsandbytes")),
        workload=workload, sizes=sizes, lora_rank=rank,
        gradient_checkpointing=args.gradient_checkpointing, training=training,
        ratios={
            "scale_ffn/lora time": training["scale_ffn"]["median_s"] / training["lora"]["median_s"],
            "scale_ffn/lora memory": training["scale_ffn"]["memory"]["est_peak_mib"]
            / training["lora"]["memory"]["est_peak_mib"],
        },
        transfer=moved,
    )
    result["wall_s"] = time.perf_counter() - started
    path = args.output_dir / f"quantized_{args.model}{'_quick' if args.quick else ''}.json"
    return write_result(result, path, format_table)


if __name__ == "__main__":
    main()
