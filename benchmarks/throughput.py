"""Throughput and memory of SCALE against its baselines, side by side on one machine and one model.

Run from the repository root::

    PYTHONPATH=. python benchmarks/throughput.py --model tiny            # ~1-2 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/throughput.py --model smollm2_shape   # SmolLM2-135M's shapes, random weights
    PYTHONPATH=. python benchmarks/throughput.py --model smollm2         # the bundled SmolLM2-135M checkpoint
    PYTHONPATH=. python benchmarks/throughput.py --quick                 # seconds: smoke run

What is measured
----------------
Every number comes from ``--warmup`` untimed runs followed by ``--repeats`` timed runs (``time.perf_counter``,
``torch.cuda.synchronize`` around each run on CUDA); the table shows the median and the spread (min-max); the
JSON keeps every sample. Precision: fp32 always; bf16 as well when CUDA is available (``--dtype`` picks one): base
weights cast to bf16, adapter weights as the PEFT method creates them (fp32, LoRA and SCALE alike), everything run
under ``torch.autocast(bf16)`` as ``Trainer(bf16=True)`` does.

Training, one step = forward with ``labels`` (causal-LM loss) + backward + ``AdamW.step`` (``fused=True``, the HF
Trainer's default optimizer) + ``zero_grad`` on a fixed random batch of ``batch x seq`` tokens; tokens/s =
``batch * seq / median step time``. Rows:

- ``full_ft``: every weight of the base model trains.
- ``floor``: every weight frozen, ``enable_input_require_grads()``, so the backward pass runs through all the
  activations but computes no weight gradient, and there is no optimizer step. No parameter-efficient method
  that trains something inside the model can be faster than this: it is the cost of backpropagating at all.
- ``lora``: PEFT LoRA on gate/up/down, rank chosen so its trainable parameter count is closest to ``scale_ffn``'s.
- ``scale_ffn``: ``ScaleConfig(ffn_expansion=k)``.
- ``scale_preserve`` / ``scale_route``: full-width SCALE, ``ScaleConfig(hidden_expansion=d_up, ffn_expansion=k,
  variant=...)``.
- ``dense_ffn``: full fine-tuning of a fresh dense model with ``intermediate_size + k`` (what ``scale_ffn``
  merges into). ``dense_wide``: fresh dense model with ``hidden_size + d_up``, the matching extra heads and
  ``intermediate_size + k`` (the size of the full-width SCALE model).

Arithmetic: each training row's FLOPs of one forward + backward, counted by ``torch.utils.flop_counter`` from the
shapes of the products that actually run (``flops`` in the JSON). ``row/(floor*arithmetic)`` = time ratio to the
floor over FLOP ratio to the floor: 1.0 means the row runs exactly as fast as its extra arithmetic allows.

SCALE-Route at evaluation (``route_eval``): evaluation forward (``eval()``, routing on) of full-width SCALE-Adapt
and SCALE-Route at the same sizes and ``preserve_layers``, and of ``base_upper``, the base model cut to its layers
from ``preserve_layers`` up (the frozen original-slice work the cosine rule's frozen slice repeats, with the LM head
of the preservation logits). ``scale_route/(scale_adapt+base_upper)`` is the price of routing over that work.

Memory of a training step. On CUDA: ``torch.cuda.max_memory_allocated`` over one step, after
``reset_peak_memory_stats`` (``peak_mib``). On CPU there is no allocator statistic that can be reset, and the
process' max RSS only ever grows, so the JSON gives an *accounting estimate* instead (``est_peak_mib``) =
parameters (all, trainable or not) + gradients (of trainable parameters) + AdamW state (after a step) + the
tensors autograd saves for backward during one forward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
each storage once, storages of parameters excluded). It leaves out transient buffers (e.g. the logits' softmax
workspace), so it is a lower bound on the true peak, but it is deterministic and comparable between rows.
``row/(lora+new state+new activations)``: the row's peak over LoRA's peak + its new parameters' weights, gradients
and AdamW state + the activations it saves beyond the floor's. On CUDA this checks that no frozen weight is copied
per step; on CPU the estimate holds by construction (tests/test_efficiency.py checks the same rule op by op).

Inference (``torch.no_grad``, eval mode): ``prefill`` = one forward of ``batch x seq`` tokens (tokens/s =
``batch * seq / time``); ``decode`` = ``generate`` with greedy search and KV cache, ``decode_tokens`` new tokens
for each of ``batch`` prompts of 8 tokens (tokens/s = ``batch * decode_tokens / time``, the short prompt's prefill
included). Rows: ``base``, ``scale_unmerged`` (the ``scale_ffn`` PEFT model), ``scale_merged``
(``merge_and_unload()`` of it), ``dense_ffn`` (fresh dense model of the merged size) and ``lora_unmerged`` (LoRA of
the same trainable size: the price any unmerged PEFT adapter pays, for comparison).

Reading the ratios: each is ``time(numerator) / time(denominator)`` of the medians, so > 1 means the numerator is
slower (for tokens/s it is the inverse). ``scale_ffn / floor`` is SCALE's overhead above the unavoidable cost of
backpropagation; ``scale_ffn / lora`` compares two PEFT methods of the same trainable size; ``scale_* / dense_wide``
asks whether a widened frozen model trains faster than the dense model of the same size; ``merged / dense_ffn``
should be ~1 (a merged SCALE model *is* a dense model); ``unmerged / base`` is the inference price of not merging.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO / "benchmarks" / "results"
FFN_MODULES = ["gate_proj", "up_proj", "down_proj"]

# Llama layouts built from a config with random weights (timing does not depend on the values). "tiny": 16 heads
# of 32 over 8 key-value heads: a new key-value head brings 2 query heads, so hidden_expansion comes in steps of 64
# (12.5% of 512). "smollm2_shape": SmolLM2-135M's exact shapes (no checkpoint needed, e.g. on a GPU machine).
RANDOM_MODELS = {
    "tiny": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
        head_dim=32, vocab_size=8192,
    ),
    "tiny_quick": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256,
    ),
    "smollm2_shape": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, tie_word_embeddings=True,
    ),
}
# Default workloads: (batch, seq, decode_tokens, warmup, repeats)
WORKLOADS = {
    "tiny": dict(batch=4, seq=128, decode_tokens=32, warmup=2, repeats=5),
    "smollm2": dict(batch=4, seq=128, decode_tokens=32, warmup=1, repeats=3),
    "smollm2_shape": dict(batch=8, seq=256, decode_tokens=32, warmup=2, repeats=5),
    "quick": dict(batch=2, seq=16, decode_tokens=4, warmup=1, repeats=2),
}
TRAIN_ROWS = ("full_ft", "floor", "lora", "scale_ffn", "scale_preserve", "scale_route", "dense_ffn", "dense_wide")
INFER_ROWS = ("base", "scale_unmerged", "scale_merged", "dense_ffn", "lora_unmerged")
# SCALE-Route at evaluation against what it must cost: SCALE-Adapt's forward plus the frozen original-slice work of
# the layers from preserve_layers up (the base model cut to those layers, with its embedding and LM head).
ROUTE_EVAL_ROWS = ("scale_adapt", "scale_route", "base_upper")
# Rows whose time is also compared with the floor scaled by their own arithmetic (FLOPs of one step / floor's).
ARITHMETIC_ROWS = ("lora", "scale_ffn", "scale_preserve", "scale_route")
# Rows whose peak memory is compared with LoRA's + their new parameters' state + their new activations.
MEMORY_ROWS = ("scale_ffn", "scale_preserve", "scale_route")
# (name, numerator row, denominator row): ratios of median times
TRAIN_RATIOS = (
    ("scale_ffn/lora", "scale_ffn", "lora"),
    ("scale_ffn/floor", "scale_ffn", "floor"),
    ("lora/floor", "lora", "floor"),
    ("full_ft/floor", "full_ft", "floor"),
    ("scale_ffn/dense_ffn", "scale_ffn", "dense_ffn"),
    ("scale_preserve/floor", "scale_preserve", "floor"),
    ("scale_route/floor", "scale_route", "floor"),
    ("scale_preserve/dense_wide", "scale_preserve", "dense_wide"),
    ("scale_route/dense_wide", "scale_route", "dense_wide"),
)
INFER_RATIOS = (
    ("scale_merged/dense_ffn", "scale_merged", "dense_ffn"),
    ("scale_merged/base", "scale_merged", "base"),
    ("scale_unmerged/base", "scale_unmerged", "base"),
    ("scale_unmerged/scale_merged", "scale_unmerged", "scale_merged"),
    ("lora_unmerged/base", "lora_unmerged", "base"),
)


# ----------------------------------------------------------------------------------------------------- models


def build_base(model: str, dtype: torch.dtype, seed: int):
    """The base model (eval mode, requested dtype) and its config."""
    torch.manual_seed(seed)
    if model == "smollm2":
        sys.path.insert(0, str(REPO / "examples"))
        from bundled import load_smollm2

        base, _ = load_smollm2(dtype=dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = {"tie_word_embeddings": False, **RANDOM_MODELS[model]}
        config = LlamaConfig(**shape, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        base = LlamaForCausalLM(config).to(dtype)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = base.config.eos_token_id
    return base.eval()


def expansion_sizes(config) -> dict:
    """ffn_expansion k (~10% of the FFN) and hidden_expansion d_up (the valid size nearest 10% of hidden, >= 1 step)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    step = head_dim * (heads // kv_heads)
    d_up = max(1, round(0.1 * config.hidden_size / step)) * step
    k = max(8, int(round(0.1 * config.intermediate_size / 8)) * 8)
    # adapt/route keep W12 at zero in the bottom quarter of the layers (the paper's L_fp is a fraction of the depth)
    preserve_layers = config.num_hidden_layers // 4
    return dict(ffn_expansion=k, hidden_expansion=d_up, hidden_step=step, head_dim=head_dim,
                preserve_layers=preserve_layers)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched (views included): in eager mode each costs a roughly fixed CPU time
    and, on a GPU, most launch a kernel, so at small token counts a step's time follows this count, not its FLOPs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_flops(model, ids: torch.Tensor, precision) -> tuple[int, int]:
    """FLOPs of one training step's forward and backward, counted by ``torch.utils.flop_counter`` from the shapes of
    the matrix products and attention calls that actually run (the optimizer's elementwise update is not counted).

    This is each row's own arithmetic: frozen weights cost a forward product and an input-gradient product, trained
    weights a weight-gradient product as well, a variant without some ``W12`` blocks does less. ``time(row) /
    time(floor)`` over ``flops(row) / flops(floor)`` is then how much slower than its arithmetic a row runs: a
    widened model cannot train faster than ``floor x arithmetic`` without doing less work.

    Also returns the number of aten operations of the step (``OpCounter``), for one sequence.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.to(ids.device).train()
    # Every product is linear in the batch, so one sequence is counted and multiplied (eager attention on the whole
    # batch would hold every layer's attention matrix).
    batch, ids = ids.shape[0], ids[:1]
    # Counted with eager attention: the counter's rule for fused attention rejects grouped-query shapes (bf16 on
    # CUDA), and eager attention does the same products.
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = transformer.config._attn_implementation
    transformer.set_attn_implementation("eager")
    counter, ops = FlopCounterMode(display=False), OpCounter()
    try:
        with counter, ops, precision():
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        transformer.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    return batch * counter.get_total_flops(), ops.count


def dense_like(base, dtype: torch.dtype, seed: int, ffn_extra: int, hidden_extra: int = 0):
    """A fresh random dense model of the base's architecture with intermediate_size + ffn_extra and, when
    hidden_extra > 0, hidden_size + hidden_extra with the heads that SCALE's full width adds (head_dim kept)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(base.config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    config.intermediate_size += ffn_extra
    if hidden_extra:
        new_heads = hidden_extra // head_dim
        config.head_dim = head_dim
        config.hidden_size += hidden_extra
        config.num_attention_heads = heads + new_heads
        config.num_key_value_heads = kv_heads + new_heads // (heads // kv_heads)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_model(base, **scale_kwargs):
    import peft_scale  # noqa: F401  (registers SCALE)
    from peft import get_peft_model
    from peft_scale import ScaleConfig

    return get_peft_model(copy.deepcopy(base), ScaleConfig(**scale_kwargs))


def lora_model(base, target_trainable: int):
    """LoRA on the FFN modules with the rank whose trainable parameter count is closest to ``target_trainable``."""
    from peft import LoraConfig, get_peft_model

    def make(rank):
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=FFN_MODULES)
        return get_peft_model(copy.deepcopy(base), config)

    per_rank = count_trainable(make(1))
    rank = max(1, round(target_trainable / per_rank))
    return make(rank), rank


def floor_model(base):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def full_model(base):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(device: torch.device, dtype: torch.dtype):
    """What ``Trainer(bf16=True)`` does: autocast to the half dtype, so that adapter weights kept in fp32 (PEFT's
    default, LoRA and SCALE alike) multiply in bf16 like the base weights. fp32 runs need no context."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device's queued work finished before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_runs(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    return [time_once(fn, device) for _ in range(repeats)]


def summarise(times: list[float], tokens: int) -> dict:
    median = statistics.median(times)
    return dict(
        median_s=median, min_s=min(times), max_s=max(times), samples_s=times, tokens=tokens,
        tokens_per_s=tokens / median,
    )


# ---------------------------------------------------------------------------------------------------- memory


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], params) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (each storage once, parameters out)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def training_memory(model, step: Callable[[], None], loss_fn, optimizer, device: torch.device) -> dict:
    """CUDA: allocator peak over one step. CPU: parameters + gradients + optimizer state + saved activations."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    memory = dict(
        param_mib=tensor_bytes(params) / 2**20,
        grad_mib=tensor_bytes(trainable) / 2**20,
        optimizer_mib=0.0,
    )
    if optimizer is not None:
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        memory["optimizer_mib"] = tensor_bytes(state) / 2**20
    memory["activation_mib"] = saved_activation_bytes(loss_fn, params) / 2**20
    memory["est_peak_mib"] = sum(memory[k] for k in ("param_mib", "grad_mib", "optimizer_mib", "activation_mib"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        memory["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


# ---------------------------------------------------------------------------------------------------- training


def maybe_compile(model, enabled: bool):
    """``torch.compile(model)`` for ``--compile`` (the warm-up runs compile it, untimed), else ``model``."""
    return torch.compile(model) if enabled else model


def bench_training(
    model, ids: torch.Tensor, warmup: int, repeats: int, precision, compile_model: bool = False, lr: float = 1e-5
) -> dict:
    device = ids.device
    flops, ops = step_flops(model, ids, precision)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: what the HF Trainer uses by default (`optim="adamw_torch_fused"`), 4x faster on a CPU than the
    # per-parameter loop, whose cost grows with the number of trainable tensors rather than with their size
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=True) if trainable else None
    forward = maybe_compile(model, compile_model)

    def loss_fn(forward=model):  # eager by default: the memory accounting hooks the saved tensors
        with precision():
            return forward(input_ids=ids, labels=ids).loss

    def step():
        loss_fn(forward).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = time_runs(step, warmup, repeats, device)
    result = summarise(times, ids.numel())
    result["trainable_params"] = sum(p.numel() for p in trainable)
    result["flops"] = flops
    result["aten_ops"] = ops
    result["memory"] = training_memory(model, step, loss_fn, optimizer, device)
    model.to("cpu")
    return result


def training_rows(base, dtype, device, ids, sizes, warmup, repeats, seed, log, compile_model=False) -> tuple[dict, dict]:
    """Every training row, built one at a time from the same base weights (freed after measuring)."""
    k, d_up, fp = sizes["ffn_expansion"], sizes["hidden_expansion"], sizes["preserve_layers"]
    precision = precision_context(device, dtype)
    scale_trainable = count_trainable(scale_model(base, ffn_expansion=k))
    builders = {
        "full_ft": lambda: full_model(base),
        "floor": lambda: floor_model(base),
        "lora": None,  # below: also returns its rank
        "scale_ffn": lambda: scale_model(base, ffn_expansion=k),
        "scale_preserve": lambda: scale_model(base, hidden_expansion=d_up, ffn_expansion=k, variant="preserve"),
        "scale_route": lambda: scale_model(
            base, hidden_expansion=d_up, ffn_expansion=k, variant="route", route_rule="cosine", preserve_layers=fp
        ),
        "dense_ffn": lambda: full_model(dense_like(base, dtype, seed, k)),
        "dense_wide": lambda: full_model(dense_like(base, dtype, seed, k, d_up)),
    }
    rows, extra = {}, {}
    for name in TRAIN_ROWS:
        torch.manual_seed(seed)
        if name == "lora":
            model, rank = lora_model(base, scale_trainable)
            extra["lora_rank"] = rank
        else:
            model = builders[name]()
        rows[name] = bench_training(model, ids, warmup, repeats, precision, compile_model)
        log(f"  train {name:<15} {rows[name]['median_s'] * 1e3:9.1f} ms")
        del model
    return rows, extra


# --------------------------------------------------------------------------------------------------- inference


def inference_fns(model, prefill_ids, prompt_ids, decode_tokens, precision, compile_model=False):
    """``(prefill, decode)``: one no-grad forward over ``prefill_ids`` and one greedy ``generate()`` of
    ``decode_tokens`` new tokens after ``prompt_ids`` (KV cache), each a closure to time."""
    model.to(prefill_ids.device).eval()
    pad = model.config.pad_token_id
    forward = maybe_compile(model, compile_model)  # prefill only: generate() runs the eager model

    @torch.no_grad()
    def prefill():
        with precision():
            forward(input_ids=prefill_ids, use_cache=False)

    @torch.no_grad()
    def decode():
        with precision():
            out = model.generate(
                input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=decode_tokens,
                min_new_tokens=decode_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
            )
        assert out.shape[1] == prompt_ids.shape[1] + decode_tokens, out.shape

    return prefill, decode


def bench_inference(model, prefill_ids, prompt_ids, decode_tokens, warmup, repeats, precision, compile_model=False):
    device = prefill_ids.device
    prefill, decode = inference_fns(model, prefill_ids, prompt_ids, decode_tokens, precision, compile_model)
    result = dict(
        prefill=summarise(time_runs(prefill, warmup, repeats, device), prefill_ids.numel()),
        decode=summarise(time_runs(decode, warmup, repeats, device), prompt_ids.shape[0] * decode_tokens),
    )
    model.to("cpu")
    return result


def bench_inference_interleaved(rows: dict, prefill_ids, prompt_ids, decode_tokens, warmup, repeats, precision) -> dict:
    """``bench_inference`` for several rows at once, timed in turn: each repeat runs every row's prefill and decode
    once, in an order rotated by one per repeat. A CPU's speed drifts over minutes (other jobs, clocks) by more than
    the few percent that separate the rows; timed one row after the other, that drift lands on whichever row ran
    in the slow minutes, timed in turn it lands on all alike.

    ``rows``: ``{name: (model, setup)}``, where ``setup()`` (or ``None``) puts the model in that row's state before
    each of its runs (rows may share one model in different states).
    """
    device = prefill_ids.device
    fns = {name: (setup, *inference_fns(model, prefill_ids, prompt_ids, decode_tokens, precision))
           for name, (model, setup) in rows.items()}
    times = {name: {"prefill": [], "decode": []} for name in rows}
    names = list(rows)
    for repeat in range(warmup + repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            setup, prefill, decode = fns[name]
            for phase, fn in (("prefill", prefill), ("decode", decode)):
                if setup is not None:
                    setup()
                seconds = time_once(fn, device)
                if repeat >= warmup:
                    times[name][phase].append(seconds)
    tokens = {"prefill": prefill_ids.numel(), "decode": prompt_ids.shape[0] * decode_tokens}
    return {name: {phase: summarise(t, tokens[phase]) for phase, t in row.items()} for name, row in times.items()}


def inference_rows(base, dtype, device, prefill_ids, prompt_ids, sizes, decode_tokens, warmup, repeats, seed, log,
                   compile_model=False):
    k = sizes["ffn_expansion"]
    run = dict(prefill_ids=prefill_ids, prompt_ids=prompt_ids, decode_tokens=decode_tokens, warmup=warmup,
               repeats=repeats, precision=precision_context(device, dtype), compile_model=compile_model)
    unmerged = scale_model(base, ffn_expansion=k)
    scale_trainable = count_trainable(unmerged)
    rows = {"base": bench_inference(base, **run)}
    rows["scale_unmerged"] = bench_inference(unmerged, **run)
    merged = unmerged.merge_and_unload()
    rows["scale_merged"] = bench_inference(merged, **run)
    del unmerged, merged
    rows["dense_ffn"] = bench_inference(dense_like(base, dtype, seed, k), **run)
    # the inference price of any unmerged PEFT adapter: LoRA of the same trainable size
    rows["lora_unmerged"] = bench_inference(lora_model(base, scale_trainable)[0], **run)
    for name, row in rows.items():
        log(f"  infer {name:<15} prefill {row['prefill']['median_s'] * 1e3:8.1f} ms  "
            f"decode {row['decode']['median_s'] * 1e3:8.1f} ms")
    return rows


def base_upper(base, from_layer: int):
    """The base model with only its decoder layers ``from_layer..`` (plus embedding and LM head): the frozen
    original-slice work that SCALE-Route's frozen slice (cosine rule) adds above ``preserve_layers`` at evaluation."""
    model = copy.deepcopy(base)
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[from_layer:])
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[from_layer:]
    return model


def route_eval_rows(base, dtype, device, prefill_ids, sizes, warmup, repeats, log, compile_model=False) -> dict:
    """Evaluation forward (``eval()``: SCALE-Route routes) of full-width adapt and route at the same sizes, and of
    the frozen work the frozen slice repeats."""
    precision = precision_context(device, dtype)
    wide = dict(hidden_expansion=sizes["hidden_expansion"], ffn_expansion=sizes["ffn_expansion"],
                preserve_layers=sizes["preserve_layers"])
    builders = {
        "scale_adapt": lambda: scale_model(base, variant="adapt", **wide),
        "scale_route": lambda: scale_model(base, variant="route", route_rule="cosine", **wide),
        "base_upper": lambda: base_upper(base, sizes["preserve_layers"]),
    }
    rows = {}
    for name in ROUTE_EVAL_ROWS:
        model = maybe_compile(builders[name]().to(device).eval(), compile_model)

        @torch.no_grad()
        def forward(model=model):
            with precision():
                model(input_ids=prefill_ids, use_cache=False)

        rows[name] = summarise(time_runs(forward, warmup, repeats, device), prefill_ids.numel())
        log(f"  eval  {name:<15} {rows[name]['median_s'] * 1e3:9.1f} ms")
        del model
    return rows


# ------------------------------------------------------------------------------------------------------ ratios


def ratios(rows: dict, spec, key: Optional[str] = None) -> dict:
    """name -> median time of numerator / median time of denominator (``key`` picks prefill/decode)."""
    out = {}
    for name, num, den in spec:
        a, b = (rows[num][key], rows[den][key]) if key else (rows[num], rows[den])
        out[name] = a["median_s"] / b["median_s"]
    return out


# ------------------------------------------------------------------------------------------------------- table


def arithmetic_ratios(train: dict) -> dict:
    """Each ``ARITHMETIC_ROWS`` row's FLOPs over the floor's (``arithmetic:row``) and its time over ``floor x`` that
    (``row/(floor*arithmetic)``: 1.0 = as fast as its arithmetic allows)."""
    out = {}
    for name in ARITHMETIC_ROWS:
        arithmetic = train[name]["flops"] / train["floor"]["flops"]
        out[f"arithmetic:{name}"] = arithmetic
        out[f"{name}/(floor*arithmetic)"] = train[name]["median_s"] / train["floor"]["median_s"] / arithmetic
    return out


def route_eval_ratio(rows: dict) -> dict:
    """SCALE-Route's evaluation forward over SCALE-Adapt's plus the frozen work its frozen slice repeats."""
    bound = rows["scale_adapt"]["median_s"] + rows["base_upper"]["median_s"]
    return {"scale_route/(scale_adapt+base_upper)": rows["scale_route"]["median_s"] / bound}


def memory_ratios(train: dict, key: str) -> dict:
    """Peak training memory of each ``MEMORY_ROWS`` row over LoRA's peak + the row's new parameters' weights,
    gradients and optimizer state + its new activations (saved activations beyond the floor's). A per-step copy of
    frozen weights would push this above 1; it is only meaningful for the allocator's real peak (CUDA)."""
    out = {}
    for name in MEMORY_ROWS:
        mem = train[name]["memory"]
        new_state = 2 * mem["grad_mib"] + mem["optimizer_mib"]  # weights (same bytes as their gradients) + grads + AdamW
        new_activations = mem["activation_mib"] - train["floor"]["memory"]["activation_mib"]
        bound = train["lora"]["memory"][key] + new_state + new_activations
        out[f"{name}/(lora+new state+new activations)"] = mem[key] / bound
    return out


def fmt_time(row: dict) -> str:
    return f"{row['median_s'] * 1e3:9.1f} [{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}]"


def format_table(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        mem_key = "peak_mib" if run["device"] == "cuda" else "est_peak_mib"
        lines.append(f"\n== {result['model']} | {run['device']} | {run['dtype']} | batch {result['workload']['batch']}"
                     f" x seq {result['workload']['seq']} | warmup {result['workload']['warmup']},"
                     f" repeats {result['workload']['repeats']} ==")
        lines.append(f"{'training step':<16}{'median ms [min-max]':>30}{'tokens/s':>11}{'trainable':>12}"
                     f"{mem_key:>14}{'GFLOP':>9}{'aten ops':>10}")
        for name, row in run["training"].items():
            lines.append(f"{name:<16}{fmt_time(row):>30}{row['tokens_per_s']:>11.0f}{row['trainable_params']:>12,}"
                         f"{row['memory'][mem_key]:>14.1f}{row['flops'] / 1e9:>9.1f}{row['aten_ops']:>10}")
        lines.append("time ratios (median; >1 = slower): " + ", ".join(
            f"{k} {v:.2f}" for k, v in run["training_ratios"].items()))
        lines.append(f"memory ratios ({mem_key}): " + ", ".join(
            f"{k} {v:.2f}" for k, v in run["memory_ratios"].items()))
        lines.append(f"\n{'evaluation forward':<20}{'median ms [min-max]':>30}   (preserve_layers "
                     f"{run['sizes']['preserve_layers']})")
        for name, row in run["route_eval"].items():
            lines.append(f"{name:<20}{fmt_time(row):>30}")
        lines.append("route ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in run["route_eval_ratios"].items()))
        lines.append(f"\n{'inference':<16}{'prefill ms [min-max]':>30}{'tok/s':>9}"
                     f"{'decode ms [min-max]':>32}{'tok/s':>9}")
        for name, row in run["inference"].items():
            p, d = row["prefill"], row["decode"]
            lines.append(f"{name:<16}{fmt_time(p):>30}{p['tokens_per_s']:>9.0f}{fmt_time(d):>32}"
                         f"{d['tokens_per_s']:>9.0f}")
        for phase in ("prefill", "decode"):
            lines.append(f"{phase} time ratios: " + ", ".join(
                f"{k} {v:.2f}" for k, v in run["inference_ratios"][phase].items()))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def machine_info(device: torch.device) -> dict:
    info = dict(
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), platform=platform.platform(), processor=platform.processor(),
        device=str(device),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft
        import transformers

        info.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2_shape", "smollm2"], default="tiny",
                        help="tiny / smollm2_shape: random weights; smollm2: the bundled checkpoint")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny sizes, 1 warm-up, 2 repeats")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32, and bf16 too on CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile'd models (training steps, prefill, route evaluation; not decode)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    workload = dict(WORKLOADS["quick" if args.quick else args.model])
    for key in workload:
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    if workload["repeats"] < 1 or workload["warmup"] < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args, workload


def warm_up_process(base, ids: torch.Tensor) -> None:
    """One untimed training step and forward before any row, so that the first row does not pay for the process'
    first-touch costs (allocator growth, thread-pool start-up, lazy kernel initialisation)."""
    model = full_model(base).to(ids.device).train()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        model.eval()(input_ids=ids[:, :8])
    del model


def run_one(args, workload, dtype, device, log) -> dict:
    model_name = "tiny_quick" if args.quick and args.model == "tiny" else args.model
    base = build_base(model_name, dtype, args.seed)
    sizes = expansion_sizes(base.config)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (workload["batch"], workload["seq"]), generator=generator).to(device)
    prompt = torch.randint(3, vocab, (workload["batch"], 8), generator=generator).to(device)
    log(f"{model_name} {dtype} on {device}: ffn_expansion {sizes['ffn_expansion']}, "
        f"hidden_expansion {sizes['hidden_expansion']}")
    warm_up_process(base, ids)
    timing = dict(warmup=workload["warmup"], repeats=workload["repeats"], log=log, compile_model=args.compile)
    train, extra = training_rows(base, dtype, device, ids, sizes, seed=args.seed, **timing)
    infer = inference_rows(base, dtype, device, ids, prompt, sizes, workload["decode_tokens"], seed=args.seed, **timing)
    route_eval = route_eval_rows(base, dtype, device, ids, sizes, **timing)
    mem_key = "peak_mib" if device.type == "cuda" else "est_peak_mib"
    return dict(
        device=device.type, dtype=str(dtype).replace("torch.", ""), model_config=dict(
            hidden_size=base.config.hidden_size, intermediate_size=base.config.intermediate_size,
            num_hidden_layers=base.config.num_hidden_layers, vocab_size=vocab,
            num_attention_heads=base.config.num_attention_heads,
            num_key_value_heads=base.config.num_key_value_heads),
        sizes=sizes, **extra, training=train, inference=infer, route_eval=route_eval,
        training_ratios={**ratios(train, TRAIN_RATIOS), **arithmetic_ratios(train)},
        memory_ratios=memory_ratios(train, mem_key),
        route_eval_ratios=route_eval_ratio(route_eval),
        inference_ratios={phase: ratios(infer, INFER_RATIOS, phase) for phase in ("prefill", "decode")},
    )


def main(argv=None) -> dict:
    args, workload = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    if args.dtype:
        dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = dict(
        model=args.model + (" (quick)" if args.quick else "") + (", torch.compile" if args.compile else ""),
        date=_dt.datetime.now().isoformat(timespec="seconds"), argv=list(sys.argv[1:] if argv is None else argv),
        workload=workload, optimizer="torch.optim.AdamW(fused=True)", machine=machine_info(device),
        runs=[run_one(args, workload, dtype, device, log) for dtype in dtypes],
    )
    result["wall_s"] = time.perf_counter() - started
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = ("_quick" if args.quick else "") + ("_compile" if args.compile else "")
    return write_result(result, args.output_dir / f"throughput_{args.model}{suffix}_{stamp}.json", format_table)


def write_result(result: dict, path: Path, format_table: Callable[[dict], str]) -> dict:
    """Write ``result`` as JSON to ``path``, print its table and where the JSON went; ``result`` gains ``json_path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    result["json_path"] = str(path)
    print(format_table(result))
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
