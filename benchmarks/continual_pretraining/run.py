"""Continual pre-training of one causal LM with every compared method: forgetting against learning.

Run from the repository root::

    python -m benchmarks.continual_pretraining.run --quick                      # smoke test, < 1 min on 1 CPU core
    python -m benchmarks.continual_pretraining.run --device cuda                # everything (15 runs x 3 lrs)
    python -m benchmarks.continual_pretraining.run --methods full scale_route --lrs 3e-5 1e-3 --steps 40
    python -m benchmarks.continual_pretraining.run --model PATH --new-text a.txt --old-text b.txt

Protocol
--------
The base model (default: the bundled SmolLM2-135M-Instruct) is loaded once; each run (method x learning rate)
starts from a deep copy of it, so every method starts from the same weights, with the same seed, and sees the same
training blocks in the same order: ``--steps`` optimizer steps of ``--batch-size`` packed blocks of ``--seq-len``
tokens of the new language (default: the bundled Spanish Wikipedia summaries, held-out documents excluded). The
replay rows (``scale_route_replay``, ``full_replay``) see the same number of blocks, a quarter of them drawn from
the old language's training documents (``benchmarks.methods.mix_with_replay``); ``full_replay_samples`` replays the
base model's own samples instead, at the same steps. Optimizer: AdamW (betas 0.9/0.999,
no weight decay) over the method's trainable parameters, linear warm-up over the first 10% of the steps then cosine
decay to zero, gradient norm clipped at 1. ``--dtype bf16`` trains and evaluates under bf16 autocast over fp32
weights (pure bf16 weights would round away full fine-tuning's updates at lr 1e-5).

The learned-route rows (``benchmarks.methods.ROUTED_METHODS``: ``scale_ffn_routed``, ``scale_routed``) fit their
router (``peft_scale.fit_router``) before training, on the first ``ROUTER_BLOCKS`` blocks of the new-language
training stream (the blocks they then train on) against an old side: the first ``ROUTER_BLOCKS`` blocks of the
old language's training documents, or, for the ``*_samples`` rows, the base model's own samples. The base samples
(``peft_scale.router_fitting.sample_base_model``: ``--seq-len`` tokens each from the beginning-of-text token,
temperature 1, seed ``--seed``; as many as the router and the replay stream need) are drawn once and cached in
``OUTPUT_DIR/base_samples.pt``, so every run and a resumed command use the same samples. Each routed run records
the router's held-out report and its fitting time (apart from training time). The ``*_defaults`` rows set nothing
but what the README's first routed example sets (``RouterConfig()``, ``create_scale_optimizer(model, lr=3e-3)``);
``scale_ffn_routed_defaults_samples`` gives ``fit_router`` no old side, so it draws the base model's samples itself.

Every ``--eval-every`` steps (and at step 0, where every method still computes the base model's logits, so the
drift must read 0) the model is evaluated in ``eval()`` mode (``measures.py``): new-language perplexity (learning),
and old-language perplexity (a), drift (b) and chat-answer perplexity (c) (forgetting).

``results.json`` is rewritten after every run; runs already in it (same settings) are skipped, so an interrupted
run continues where it stopped. Runs go learning rate by learning rate (each method's middle value first), so a
run cut short still has every method at one learning rate. At the end ``results.md`` (tables and the command) and
the PNG plots are (re)written from ``results.json`` (``report.py``).

Budget: the defaults (60 steps x 4 blocks x 128 tokens = 30,720 training tokens, 4 evaluations of 16 + 16 blocks
and 24 answers) keep one run (one method at one learning rate) under 15 minutes on one thread of the 2-core CPU this
was written on, which other jobs kept busy: measured there, a training step of SmolLM2-135M took 7.7 s (full
fine-tuning) and 8.1 s (SCALE-Route, the slowest), an evaluation 35 s and 72 s; the base model's reference (its
log-probabilities and greedy answers) and loading take about 1.5 minutes once per command.

Sizes (``benchmarks.methods.MethodSizes``), derived from the model's config unless given:
``--hidden-expansion`` = the smallest valid width (one new key-value group of heads: head size x query heads per
key-value head; SmolLM2: 64 x 3 = 192, +33% width); ``--ffn-expansion`` = intermediate size / 6 (SmolLM2: 256,
+17% FFN neurons); ``--preserve-layers`` = a quarter of the layers, rounded (SmolLM2: 8 of 30; the paper finds
forgetting grows fast as this shrinks; Freeze freezes the same bottom layers); ``--llama-pro-blocks`` = the divisor
of the layer count closest to a fifth of it (SmolLM2: 6 copies, one after every 5 layers, +20% depth, near LLaMA
Pro's 8 copies over 32 layers).

Learning rates (``DEFAULT_LRS``): the paper used 1e-3 for SCALE, 2e-4 for LLaMA Pro and 1e-5 for full fine-tuning and
the other baselines, over far more steps than fit here; each method gets its paper value and the values around it
that a short run can use (new weights trained from scratch need the larger rates of LoRA and SCALE; updates to
pre-trained weights need small ones).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from transformers import get_cosine_schedule_with_warmup

from benchmarks.continual_pretraining import measures, report
from benchmarks.continual_pretraining.data import (
    as_blocks, build_text, documents_or_summaries, replay_stream, replayed_rows,
)  # fmt: skip
from benchmarks.continual_pretraining.prompts import ENGLISH_CHAT_PROMPTS
from benchmarks.methods import (
    METHODS, README_ROUTED_LR, ROUTED_METHODS, ROUTER_0_1_0, MethodSizes, fit_method_router, prepare_method,
)  # fmt: skip
from peft_scale import create_scale_optimizer, scale_optimizer_param_groups

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT_DIR = REPO / "benchmarks" / "results" / "continual_pretraining"
QUICK_OUTPUT_DIR = DEFAULT_OUTPUT_DIR / "quick"

REPLAY_FRACTION = 0.25  # the share of old-side blocks in the replay rows (arXiv 2508.01908 tested 25%)
ROUTER_BLOCKS = 64  # blocks of each side that the learned router is fitted on (fit_router's default sample count)
# where a run's old side comes from: the old language's documents, the base model's samples drawn by the runner, or
# none given to fit_router (old_data=None: it draws the base model's samples itself)
OLD_SIDES = {"old_data": "old data", "base_samples": "base model samples",
             "fit_router_samples": "base model samples drawn by fit_router (old_data=None)"}  # fmt: skip


class Run(NamedTuple):
    """One row of the experiment: the method whose model trains, the share of old-side blocks mixed into its
    training stream, and where its old side (the replayed blocks, the learned router's old examples) comes from
    (``OLD_SIDES``): ``"old_data"`` (the old language's training documents), ``"base_samples"`` (the base model's own
    samples, drawn once by the runner and cut like the new blocks) or ``"fit_router_samples"`` (none given:
    ``fit_router(old_data=None)`` draws the base model's samples itself, ``peft_scale.BaseModelSamples()``).
    ``w12_lr_ratio``: the learning rate of SCALE's zero-started readout ``W12`` over the run's (``peft_scale.
    scale_optimizer_param_groups``; 1: one learning rate for every block). ``scale_options``: ``ScaleConfig`` fields
    of this row only, ``(name, value)`` pairs over the command's ``--scale-option``s. ``router_options``: the learned
    router's ``RouterConfig`` fields of this row, ``(name, value)`` pairs (its ``seed`` is always the command's
    ``--seed``); the rows measured before peft-scale 0.2 name 0.1.0's settings (``ROUTER_0_1_0``) and theirs.
    ``scale_optimizer``: the optimizer is ``peft_scale.create_scale_optimizer(model, lr=lr)`` with its defaults (the
    README's), instead of AdamW over ``w12_lr_ratio``'s groups."""

    method: str
    replay: float = 0.0
    old_side: str = "old_data"
    w12_lr_ratio: float = 1.0
    scale_options: tuple = ()
    router_options: tuple = ()
    scale_optimizer: bool = False


def router_0_1_0(**fields) -> tuple:
    """A row's ``router_options``: peft-scale 0.1.0's router settings (``ROUTER_0_1_0``, what the rows measured
    before 0.2 used) with ``fields`` over them."""
    return tuple({**ROUTER_0_1_0, **fields}.items())


_EMA = router_0_1_0(smoothing=0.8)
_EMA_COPY = router_0_1_0(smoothing=0.8, preservation_copy=True)
RUNS = {
    **{name: Run(name) for name in METHODS},
    "scale_route_replay": Run("scale_route", REPLAY_FRACTION),
    "full_replay": Run("full", REPLAY_FRACTION),
    "full_replay_samples": Run("full", REPLAY_FRACTION, "base_samples"),
    "scale_ffn_routed": Run("scale_ffn_routed", router_options=router_0_1_0()),
    "scale_ffn_routed_samples": Run("scale_ffn_routed", old_side="base_samples", router_options=router_0_1_0()),
    "scale_routed": Run("scale_routed", router_options=router_0_1_0()),
    "scale_routed_samples": Run("scale_routed", old_side="base_samples", router_options=router_0_1_0()),
    # Behind the router, old text no longer pays for larger steps (learning_per_step_findings.md): W12 at 4x the rate
    "scale_ffn_routed_w12x4": Run("scale_ffn_routed", w12_lr_ratio=4.0, router_options=router_0_1_0()),
    "scale_ffn_routed_samples_w12x4": Run(
        "scale_ffn_routed", old_side="base_samples", w12_lr_ratio=4.0, router_options=router_0_1_0()
    ),
    "scale_routed_samples_w12x4": Run(
        "scale_routed", old_side="base_samples", w12_lr_ratio=4.0, router_options=router_0_1_0()
    ),
    # Ungated, W12 at 10x the run's rate and the new neurons' input rows at it (on the biographies, W12 at 1e-3
    # forgot less the slower the rest trained: benchmarks/results/biography/findings.md, "W12's learning rate")
    "scale_ffn_w12x10": Run("scale_ffn", w12_lr_ratio=10.0),
    # the router's score smoothed over the preceding tokens (learned_router_findings.md, the smoothing diagnostic)
    "scale_ffn_routed_w12x4_ema": Run("scale_ffn_routed", w12_lr_ratio=4.0, router_options=_EMA),
    "scale_ffn_routed_samples_w12x4_ema": Run(
        "scale_ffn_routed", old_side="base_samples", w12_lr_ratio=4.0, router_options=_EMA
    ),
    "scale_ffn_routed_samples_w12x16_ema": Run(
        "scale_ffn_routed", old_side="base_samples", w12_lr_ratio=16.0, router_options=_EMA
    ),
    # (The rows _ema_old, _ema_fall and _ema_fall_copy, whose router options smoothing_start="old" and smoothing_fall
    # measured no gain and were removed in 0.2, are no longer run: learned_router_findings.md, "Rows removed".)
    # a looser forgetting budget for the router (max_old_error: 5% of the calibration part's old tokens may reach
    # the expansion, 0.1.0's default 1%), where the drift is far below its goal: more new text to the expansion
    "scale_ffn_routed_samples_w12x4_ema_err5": Run(
        "scale_ffn_routed", old_side="base_samples", w12_lr_ratio=4.0, router_options=router_0_1_0(smoothing=0.8, max_old_error=0.05)
    ),
    # RouterConfig's defaults with nothing else set but what the README's first routed example sets (lr 3e-3,
    # create_scale_optimizer's defaults): with old data (the English training blocks), and with fit_router(old_data=None)
    "scale_ffn_routed_defaults": Run("scale_ffn_routed", scale_optimizer=True),
    "scale_ffn_routed_defaults_samples": Run("scale_ffn_routed", old_side="fit_router_samples", scale_optimizer=True),
}
# the same rows with the preservation copy (preservation_copy; it acts where no gradient is recorded, so their
# training is the same): the old tokens routed to the base model read its keys and values in mixed windows too
COPIED = ("scale_ffn_routed_w12x4_ema", "scale_ffn_routed_samples_w12x4_ema_err5")
RUNS.update({
    f"{name}_copy": RUNS[name]._replace(router_options=(*RUNS[name].router_options, ("preservation_copy", True)))
    for name in COPIED
})  # fmt: skip
# with the copy, the drift on old text is the share of old tokens sent to the expansion times their drift: a tighter
# forgetting budget (max_old_error 0.5% instead of 1%) for the (a) smoothed row
RUNS["scale_ffn_routed_w12x4_ema_strict_copy"] = RUNS["scale_ffn_routed_w12x4_ema_copy"]._replace(
    router_options=router_0_1_0(smoothing=0.8, preservation_copy=True, max_old_error=0.005)
)
# the same budget, its tail read off every old block scored out of fold (calibrate_on="cross_fitted"): 64
# blocks instead of the calibration part's 13; router_first_tokens.py found the threshold, not the router, decides)
RUNS["scale_ffn_routed_w12x4_ema_xfit_copy"] = RUNS["scale_ffn_routed_w12x4_ema_copy"]._replace(
    router_options=router_0_1_0(smoothing=0.8, preservation_copy=True, max_old_error=0.005, calibrate_on="cross_fitted")
)
# and the budget the drift goal asks for: <= 0.01 nats at ~2.4 nats per old token sent to the expansion is <= 0.42%
# of them, so 0.3% with a margin
RUNS["scale_ffn_routed_w12x4_ema_xfit3_copy"] = RUNS["scale_ffn_routed_w12x4_ema_copy"]._replace(
    router_options=router_0_1_0(smoothing=0.8, preservation_copy=True, max_old_error=0.003, calibrate_on="cross_fitted")
)
# the (a) smoothed row with the copy and a soft gate (gate="soft": the expansion weighed by how far the score clears
# the threshold): an English token misrouted at a score just above it gets little expansion
RUNS["scale_ffn_routed_w12x4_ema_soft_copy"] = RUNS["scale_ffn_routed_w12x4_ema_copy"]._replace(
    router_options=(*RUNS["scale_ffn_routed_w12x4_ema_copy"].router_options, ("gate", "soft"))
)
_ERR5_COPY = RUNS["scale_ffn_routed_samples_w12x4_ema_err5_copy"]
RUNS["scale_ffn_routed_samples_w12x4_ema_err5_soft_copy"] = _ERR5_COPY._replace(
    router_options=(*_ERR5_COPY.router_options, ("gate", "soft"))
)
# both: the budget read off every old block and the soft gate
RUNS["scale_ffn_routed_w12x4_ema_xfit3_soft_copy"] = RUNS["scale_ffn_routed_w12x4_ema_xfit3_copy"]._replace(
    router_options=(*RUNS["scale_ffn_routed_w12x4_ema_xfit3_copy"].router_options, ("gate", "soft"))
)
_SMALL, _MIDDLE, _LARGE = (1e-5, 3e-5, 1e-4), (1e-4, 3e-4, 1e-3), (3e-4, 1e-3, 3e-3)
DEFAULT_LRS = {
    "full": _SMALL, "full_replay": _SMALL, "full_replay_samples": _SMALL, "freeze": _SMALL,
    "lora": _MIDDLE, "llama_pro": _MIDDLE,
    "scale_ffn": _LARGE, "scale_preserve": _LARGE, "scale_adapt": _LARGE, "scale_route": _LARGE,
    "scale_route_replay": _LARGE,
    "scale_ffn_routed": _LARGE, "scale_ffn_routed_samples": _LARGE, "scale_routed": _LARGE,
    "scale_routed_samples": _LARGE, "scale_ffn_w12x10": _MIDDLE, "scale_ffn_routed_w12x4": _LARGE, "scale_ffn_routed_samples_w12x4": _LARGE,
    "scale_routed_samples_w12x4": _LARGE, "scale_ffn_routed_w12x4_ema": _LARGE,
    "scale_ffn_routed_samples_w12x4_ema": _LARGE, "scale_ffn_routed_samples_w12x16_ema": _LARGE,
    "scale_ffn_routed_samples_w12x4_ema_err5": _LARGE, **{f"{name}_copy": _LARGE for name in COPIED},
    "scale_ffn_routed_w12x4_ema_strict_copy": _LARGE, "scale_ffn_routed_w12x4_ema_xfit_copy": _LARGE,
    "scale_ffn_routed_w12x4_ema_xfit3_copy": _LARGE, "scale_ffn_routed_w12x4_ema_soft_copy": _LARGE,
    "scale_ffn_routed_samples_w12x4_ema_err5_soft_copy": _LARGE, "scale_ffn_routed_w12x4_ema_xfit3_soft_copy": _LARGE,
    # the README's rate for a routed adapter, and only it: these rows set nothing the README does not
    "scale_ffn_routed_defaults": (README_ROUTED_LR,), "scale_ffn_routed_defaults_samples": (README_ROUTED_LR,),
}  # fmt: skip
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
# The settings of --quick (flags given explicitly still win): a tiny random Llama with the bundled tokenizer, a few
# hundred documents, a handful of steps; it checks that the pipeline works, not what it measures.
QUICK_DEFAULTS = dict(
    model="tiny", steps=4, batch_size=2, seq_len=32, eval_every=2, eval_blocks=2, eval_batch_size=2,
    held_out_documents=20, max_documents=300, prompts=4, max_new_tokens=8,
)  # fmt: skip


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the training blocks, the held-out text and the chat answers (this experiment's and
    ``sequence.py``'s)."""
    parser.add_argument("--batch-size", type=int, default=4, help="packed blocks per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per language")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--held-out-documents", type=int, default=400, help="documents per language never trained on")
    parser.add_argument("--max-documents", type=int, default=None, help="use only the first N documents per language")
    parser.add_argument("--prompts", type=int, default=len(ENGLISH_CHAT_PROMPTS), help="chat prompts for measure (c)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length limit of the base model's answers")


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of where and how the model runs."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.continual_pretraining.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_DEFAULTS}, each method's middle lr")
    parser.add_argument("--model", default="bundled", help="'bundled' (SmolLM2-135M-Instruct), 'tiny', or a HF path/id")
    parser.add_argument("--new-text", nargs="+", default=None, help="text files to learn (default: Spanish summaries)")
    parser.add_argument("--old-text", nargs="+", default=None, help="old-language text (default: English summaries)")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="METHOD",
                        help=f"runs to make, from {list(RUNS)} (default: all)")  # fmt: skip
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="learning rates for every method (default: each method's sweep, DEFAULT_LRS)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (and at 0 and the end)")
    add_text_arguments(parser)
    parser.add_argument("--ffn-expansion", type=int, default=None)
    parser.add_argument("--hidden-expansion", type=int, default=None)
    parser.add_argument("--preserve-layers", type=int, default=None)
    parser.add_argument("--llama-pro-blocks", type=int, default=None)
    parser.add_argument("--scale-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra ScaleConfig field for every scale_* method, for ablations (repeatable), e.g. "
                        "adapt_modules=attention, init=normal, route_threshold=0.9")  # fmt: skip
    add_machine_arguments(parser)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"default: {DEFAULT_OUTPUT_DIR.relative_to(REPO)} ({QUICK_OUTPUT_DIR.relative_to(REPO)} "
                        "with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly win over the quick defaults
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = QUICK_OUTPUT_DIR if args.quick else DEFAULT_OUTPUT_DIR
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------- the model


def load_model(name: str):
    """(model in fp32, tokenizer): the bundled SmolLM2, a tiny random Llama with its tokenizer, or a HF model."""
    if name == "bundled":
        from bundled import load_smollm2  # examples/ is on the path (data.py)

        return load_smollm2()
    if name == "tiny":
        return tiny_llama_with_bundled_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)


def tiny_llama_with_bundled_tokenizer(seed: int = 0):
    """A 4-layer Llama with random weights over SmolLM2's tokenizer (and chat template): for --quick."""
    from bundled import SMOLLM2_GGUF, smollm2_folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


def default_sizes(config, args: argparse.Namespace) -> MethodSizes:
    """The sizes of every method (see the module docstring), from the model's config unless given."""
    layers = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    closest_divisor = min((d for d in range(1, layers + 1) if layers % d == 0), key=lambda d: abs(d - layers / 5))
    return MethodSizes(
        ffn_expansion=args.ffn_expansion or max(1, config.intermediate_size // 6),
        hidden_expansion=args.hidden_expansion or head_dim * (heads // kv_heads),
        preserve_layers=args.preserve_layers if args.preserve_layers is not None else round(layers / 4),
        llama_pro_blocks=args.llama_pro_blocks or closest_divisor,
        scale_options=dict(parse_option(option) for option in args.scale_option),
    )


def parse_option(option: str) -> tuple[str, object]:
    """``"key=value"`` -> ``(key, value)``, the value read as JSON (numbers, true/false) or else kept as text."""
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise SystemExit(f"--scale-option {option!r}: write KEY=VALUE, e.g. adapt_modules=attention.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ----------------------------------------------------------------------------------------------- one training run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model, text, reference: dict, args, route_thresholds=()) -> tuple[dict[str, float], dict]:
    """Learning and the three forgetting measures of ``model`` (see ``measures.py``), as one point of the curves:
    ``new_*`` on the new-language blocks, ``old_*`` and ``drift*`` on the old-language blocks, ``answer_*``,
    ``switch_*`` on text that switches from the new language to the old one (``measures.switch_measures``);
    and SCALE-Route's evaluation-only threshold sweep ``{"new": ..., "old": ...}`` when ``route_thresholds`` are given
    (empty for other methods)."""
    new = measures.text_measures(model, text.new_eval, args.eval_batch_size, args.dtype, None, route_thresholds)
    old = measures.text_measures(
        model, text.old_eval, args.eval_batch_size, args.dtype, reference["old_logprobs"], route_thresholds
    )
    sweep = {name: part.pop("threshold_sweep") for name, part in (("new", new), ("old", old)) if "threshold_sweep" in part}
    point = {f"new_{key}": value for key, value in new.items()}
    point.update({key if key.startswith("drift") else f"old_{key}": value for key, value in old.items()})
    answers = measures.answer_measures(model, reference["answers"], args.eval_batch_size, args.dtype, reference["pad_id"])
    point.update({f"answer_{key}": value for key, value in answers.items()})
    switch = measures.switch_measures(
        model, text.switch_eval, text.switch_at, reference["switch_logprobs"], args.eval_batch_size, args.dtype
    )
    point.update({f"switch_{key}": value for key, value in switch.items()})
    return point, sweep


@dataclass
class OldSide:
    """One source of old-side text: ``router`` (the learned router's old examples, ``(rows, seq_len)``) and
    ``replay`` (the training stream with a ``REPLAY_FRACTION`` share of it mixed in), either ``None`` when no
    planned run needs it; ``digest`` identifies the base samples (the same in every run that used them)."""

    label: str
    router: Optional[Union[torch.Tensor, list]] = None  # what the router reads (token ids, or dicts of them)
    replay: Optional[torch.Tensor] = None
    digest: Optional[str] = None


def optimizer_and_schedule(parameters, lr: float, steps: int):
    """Every run's optimizer: AdamW (betas 0.9/0.999, no weight decay) over ``parameters`` (tensors, or parameter
    groups with their own ``lr``), linear warm-up over the first ``WARMUP_FRACTION`` of ``steps`` then cosine decay
    to zero (the schedule scales every group's rate by the same factor)."""
    return with_schedule(torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0), steps)


def with_schedule(optimizer, steps: int):
    """``(optimizer, schedule)``: linear warm-up over the first ``WARMUP_FRACTION`` of ``steps``, then cosine decay
    to zero (the README's ``TrainingArguments(lr_scheduler_type="cosine", warmup_steps=0.1)``)."""
    return optimizer, get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP_FRACTION * steps), steps)


def parameter_groups(model, parameters: list, lr: float, w12_lr_ratio: float = 1.0):
    """What a row's optimizer trains: ``parameters`` as they are, or, with ``W12`` at ``w12_lr_ratio`` times ``lr``,
    ``peft_scale.scale_optimizer_param_groups`` (the SCALE blocks' own groups)."""
    return parameters if w12_lr_ratio == 1.0 else scale_optimizer_param_groups(model, lr, w12_lr_ratio=w12_lr_ratio)


def with_scale_options(sizes: MethodSizes, options: tuple) -> MethodSizes:
    """``sizes`` with a row's ``ScaleConfig`` fields (``(name, value)`` pairs) over the command's ``--scale-option``s."""
    return replace(sizes, scale_options={**sizes.scale_options, **dict(options)}) if options else sizes


def train_step(model, batch: torch.Tensor, parameters: list, optimizer, schedule, precision: str) -> tuple[float, float]:
    """One optimizer step of ``model`` on ``batch`` (token ids, the labels too), the gradient norm clipped at
    ``MAX_GRAD_NORM``; returns the loss and the step's time in seconds."""
    model.train()
    device = measures.model_device(model)
    batch = batch.to(device)
    synchronize(device)
    start = time.perf_counter()
    with measures.autocast(device, precision):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # .item() waits for the step, so the time below is the step's
    return value, time.perf_counter() - start


def train_run(
    base_model, run_name: str, lr: float, text, reference: dict, sizes: MethodSizes, args, old_sides: dict[str, OldSide]
) -> dict:
    """Train one (method, learning rate) from a copy of ``base_model`` and return its record for results.json.

    ``old_sides``: ``OLD_SIDES`` key -> ``OldSide``, what the replay rows replay and the routed rows' routers read."""
    method, replay, old_source, w12_lr_ratio, row_options, router_options, scale_optimizer = RUNS[run_name]
    router_config = {**dict(router_options), "seed": args.seed} if method in ROUTED_METHODS else None
    sizes = with_scale_options(sizes, (*row_options, *((("router", router_config),) if router_config else ())))
    old_side = old_sides[old_source]
    device = torch.device(args.device)
    started = time.perf_counter()
    torch.manual_seed(args.seed)  # the same initialisation of new weights for every learning rate
    model = prepare_method(method, copy.deepcopy(base_model), sizes).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in parameters)
    if scale_optimizer:  # the README's: create_scale_optimizer's defaults (AdamW, W12 at 4x), the same schedule
        optimizer, schedule = with_schedule(create_scale_optimizer(model, lr=lr), args.steps)
    else:
        optimizer, schedule = optimizer_and_schedule(parameter_groups(model, parameters, lr, w12_lr_ratio), lr, args.steps)
    blocks = old_side.replay if replay else text.new_train
    prepare_seconds = time.perf_counter() - started
    router = None
    if method in ROUTED_METHODS:  # fitted before training, on the base model's stream entering preserve_layers
        start = time.perf_counter()
        fitted = fit_method_router(model, text.new_train[:ROUTER_BLOCKS], old_side.router)
        fit_seconds = time.perf_counter() - start
        router = {
            "old_side": old_side.label,  # fit_router's own report says "old data" for any tensors it is given
            "new_side": f"the first {min(ROUTER_BLOCKS, len(text.new_train))} new-language training blocks",
            "old_blocks": None if old_side.router is None else len(old_side.router),
            "config": asdict(model.peft_config["default"].router),  # RouterConfig, as fitted
            "base_samples_digest": old_side.digest,
            "report": asdict(fitted),
            "fit_seconds": fit_seconds,
        }
        print(f"  {run_name} lr={lr:g}: router fitted in {fit_seconds:.0f} s (old side: {old_side.label})\n{fitted}",
              flush=True)  # fmt: skip
    # SCALE-Route's evaluation-only threshold sweep needs the cosine rule's two heads
    thresholds = measures.ROUTE_THRESHOLDS if route_rule_of(method, sizes) == "cosine" else ()

    curve: dict[str, list] = {"step": []}
    losses, step_seconds, eval_seconds = [], [], 0.0

    sweep = {}

    def record(step: int, route_thresholds=()) -> None:
        nonlocal eval_seconds, sweep
        start = time.perf_counter()
        point, sweep = evaluate(model, text, reference, args, route_thresholds)
        eval_seconds += time.perf_counter() - start
        curve["step"].append(step)
        for key, value in point.items():
            curve.setdefault(key, []).append(value)

    record(0)
    for step in range(1, args.steps + 1):
        batch = blocks[(step - 1) * args.batch_size : step * args.batch_size]
        loss, seconds = train_step(model, batch, parameters, optimizer, schedule, args.dtype)
        losses.append(loss)
        step_seconds.append(seconds)
        if not math.isfinite(losses[-1]):
            print(f"  {run_name} lr={lr:g}: loss became {losses[-1]} at step {step}; stopping this run", flush=True)
            break
        if step % args.eval_every == 0 or step == args.steps:
            record(step, thresholds if step == args.steps else ())
            shown = ", ".join(f"{k}={v[-1]:.4g}" for k, v in curve.items() if k != "step" and v[-1] is not None)
            print(f"  {run_name} lr={lr:g} step {step}: {shown}", flush=True)
    return {
        "method": method,
        "run": run_name,
        "lr": lr,
        "replay_fraction": replay,
        **({"w12_lr_ratio": w12_lr_ratio} if w12_lr_ratio != 1.0 else {}),
        **({"scale_options": dict(row_options)} if row_options else {}),
        **({"router_options": dict(router_options)} if router_options else {}),
        **({"optimizer": "create_scale_optimizer(model, lr=lr)"} if scale_optimizer else {}),
        "old_side": old_side.label if replay or router else None,
        **({"base_samples_digest": old_side.digest} if replay and old_side.digest else {}),
        "trainable_parameters": trainable,
        "curve": curve,
        "final": {key: values[-1] for key, values in curve.items()},
        "route_threshold_sweep": sweep,  # SCALE-Route with the cosine rule only, at the last step
        **({"router": router} if router else {}),
        "train_loss": losses,
        "seconds": {
            "prepare": prepare_seconds,
            **({"router_fit": router["fit_seconds"]} if router else {}),
            "train": sum(step_seconds),
            "evaluate": eval_seconds,
            "step_median": sorted(step_seconds)[len(step_seconds) // 2],
        },
    }


def route_rule_of(method: str, sizes: MethodSizes) -> Optional[str]:
    """The routing rule of ``method`` (``"cosine"``, ``"learned"``) or ``None`` for a method that does not route."""
    if method in ROUTED_METHODS:
        return "learned"
    if method == "scale_route":
        return sizes.scale_options.get("route_rule", "cosine")
    return None


# ------------------------------------------------------------------------------------- the base model's samples


SAMPLE_BATCH = 8  # sequences per generate() call (fit_router's default batch size); part of the samples' key


def base_samples_needed(args) -> int:
    """How many base samples one command draws: enough for a router's old side and for the replay stream's old
    rows (the same count whichever runs are planned, so that every command of one output folder draws the same)."""
    return max(ROUTER_BLOCKS, replayed_rows(REPLAY_FRACTION, args.seed, args.steps * args.batch_size))


def base_samples(model, args) -> tuple[torch.Tensor, dict]:
    """The base model's own samples, ``(n, seq_len)``: drawn once (``sample_base_model`` from the
    beginning-of-text token, seed ``args.seed``) and cached in ``OUTPUT_DIR/base_samples.pt`` under the settings
    they depend on; a cache made under other settings is replaced. Returns the samples and their description."""
    from peft_scale.router_fitting import default_prompts, sample_base_model

    count = base_samples_needed(args)
    key = dict(model=args.model, seed=args.seed, length=args.seq_len, count=count, batch_size=SAMPLE_BATCH,
               dtype=args.dtype, device_type=torch.device(args.device).type, prompt="bos")  # fmt: skip
    path = args.output_dir / "base_samples.pt"
    started = time.perf_counter()
    if path.is_file():
        cached = torch.load(path)
        if cached["key"] == key:
            samples = cached["samples"]
            return samples, {**key, "file": path.name, "digest": digest(samples), "seconds": cached["seconds"]}
        print(f"{path} was sampled under {cached['key']}, not {key}: sampling again", flush=True)
    with measures.autocast(torch.device(args.device), args.dtype):
        rows = sample_base_model(model, default_prompts(model), count, args.seq_len, SAMPLE_BATCH, args.seed, False)
    samples = torch.stack(rows).cpu()
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "samples": samples, "seconds": seconds}, path)
    print(f"Sampled {count} base-model sequences of {args.seq_len} tokens in {seconds:.0f} s -> {path}", flush=True)
    return samples, {**key, "file": path.name, "digest": digest(samples), "seconds": seconds}


def digest(ids: torch.Tensor) -> str:
    """A short fingerprint of token ids (to check that two runs used the same samples)."""
    import hashlib

    return hashlib.sha1(ids.long().numpy().tobytes()).hexdigest()[:16]


def old_sides_for(planned: list[tuple[str, float]], model, text, args, results: dict) -> dict[str, OldSide]:
    """The ``OldSide`` of each source that a planned run needs (the base samples are drawn or loaded only then)."""
    needs = {(RUNS[name].old_side, "replay" if RUNS[name].replay else "router")
             for name, _ in planned if RUNS[name].replay or RUNS[name].method in ROUTED_METHODS}  # fmt: skip
    sides = {"old_data": OldSide(OLD_SIDES["old_data"], text.old_train, text.replay_train),
             "fit_router_samples": OldSide(OLD_SIDES["fit_router_samples"])}  # fit_router(old_data=None) samples  # fmt: skip
    if any(source == "base_samples" for source, _ in needs):
        samples, described = base_samples(model, args)
        results["base_samples"] = described
        replay = None
        if ("base_samples", "replay") in needs:
            replay = replay_stream(text.new_blocks, as_blocks(samples), REPLAY_FRACTION, args.seed, len(text.new_train))
        # the router reads the samples as fit_router(old_data=None) would: cut like the new blocks (windows of
        # running text, no <s>), not as they were drawn (each from <s>)
        from peft_scale.router_fitting import cut_like_new_data, default_prompts

        windows = cut_like_new_data(list(samples[:ROUTER_BLOCKS]), list(text.new_train[:ROUTER_BLOCKS]),
                                    default_prompts(model), args.seed)  # fmt: skip
        router_side = [{"input_ids": ids} for ids in windows]
        sides["base_samples"] = OldSide(OLD_SIDES["base_samples"], router_side, replay, described["digest"])
    return sides


# ---------------------------------------------------------------------------------------------- the whole sweep


def planned_runs(args) -> list[tuple[str, float]]:
    """(run name, lr) in the order they run: each method's middle learning rate first, then the others."""
    sweeps = {name: ([args.lrs[len(args.lrs) // 2]] if args.quick else list(args.lrs)) if args.lrs else
              ([DEFAULT_LRS[name][len(DEFAULT_LRS[name]) // 2]] if args.quick else list(DEFAULT_LRS[name]))
              for name in args.methods}  # fmt: skip
    ordered = {name: [lrs[len(lrs) // 2]] + [lr for i, lr in enumerate(lrs) if i != len(lrs) // 2] for name, lrs in sweeps.items()}
    depth = max(len(lrs) for lrs in ordered.values())
    return [(name, lrs[i]) for i in range(depth) for name, lrs in ordered.items() if i < len(lrs)]


def run_key(name: str, lr: float) -> str:
    return f"{name}@{lr:g}"


def settings_of(args, sizes: MethodSizes) -> dict:
    """What a run's numbers depend on; results.json's runs are only reused under the same settings."""
    keys = ("model", "new_text", "old_text", "steps", "batch_size", "seq_len", "eval_every", "eval_blocks",
            "held_out_documents", "max_documents", "prompts", "max_new_tokens", "dtype", "seed")  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    settings.update(device_type=torch.device(args.device).type, sizes=vars(sizes), replay_fraction=REPLAY_FRACTION)
    return settings


def load_results(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"settings": settings, "runs": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != settings:
        raise SystemExit(
            f"{path} holds runs made with other settings:\n  {results.get('settings')}\nnow:\n  {settings}\n"
            "Give another --output-dir, or delete that results.json to start over."
        )
    return results


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=True))
    os.replace(tmp, path)  # a run killed mid-write leaves the previous file whole


def base_reference(model, tokenizer, text, args, cached_answers: Optional[list[dict]]) -> tuple[dict, dict]:
    """What every run is compared with: the base model's log-probabilities of the old-language blocks (kept in
    memory, for the drift) and its greedy answers (generated once and kept in results.json, so a resumed run scores
    the same answers); and the base model's own measures."""
    old_logprobs = measures.block_logprobs(model, text.old_eval, args.eval_batch_size, args.dtype)
    switch_logprobs = measures.block_logprobs(model, text.switch_eval, args.eval_batch_size, args.dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cached_answers:
        answers = [measures.ChatAnswer(**answer) for answer in cached_answers]
    else:
        prompts = ENGLISH_CHAT_PROMPTS[: args.prompts]
        answers = measures.generate_base_answers(model, tokenizer, prompts, args.max_new_tokens, len(prompts), args.dtype)
    reference = {"old_logprobs": old_logprobs, "switch_logprobs": switch_logprobs, "answers": answers, "pad_id": pad_id}
    return reference, evaluate(model, text, reference, args)[0]


def machine_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.continual_pretraining.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model = model.to(args.device).eval()  # each run deep-copies it on the device
    sizes = default_sizes(model.config, args)
    settings = settings_of(args, sizes)
    results_path = args.output_dir / "results.json"
    results = load_results(results_path, settings)

    new_documents = documents_or_summaries(args.new_text, "es")[: args.max_documents]
    old_documents = documents_or_summaries(args.old_text, "en")[: args.max_documents]
    planned = [(name, lr) for name, lr in planned_runs(args) if run_key(name, lr) not in results["runs"]]
    routed_on_old_data = any(RUNS[n].method in ROUTED_METHODS and RUNS[n].old_side == "old_data" for n, _ in planned)
    text = build_text(
        tokenizer, new_documents=new_documents, old_documents=old_documents,
        held_out_documents=args.held_out_documents, eval_blocks=args.eval_blocks,
        train_blocks=args.steps * args.batch_size, seq_len=args.seq_len,
        replay_fraction=REPLAY_FRACTION if any(RUNS[name].replay for name in args.methods) else 0.0, seed=args.seed,
        old_train_blocks=ROUTER_BLOCKS if routed_on_old_data else 0,
    )  # fmt: skip
    reference, base = base_reference(model, tokenizer, text, args, results.get("base_answers"))
    results.update(
        machine=machine_description(args.device), base=base, base_answers=[vars(a) for a in reference["answers"]],
        text_epochs=text.epochs,
    )  # fmt: skip
    old_sides = old_sides_for(planned, model, text, args, results)
    print(f"Base model: {base}  (setup {time.perf_counter() - started:.0f} s)", flush=True)

    for name, lr in planned_runs(args):
        key = run_key(name, lr)
        if key in results["runs"]:
            print(f"{key}: already in {results_path}, skipped", flush=True)
            continue
        print(f"{key}: training", flush=True)
        results["runs"][key] = train_run(model, name, lr, text, reference, sizes, args, old_sides)
        if command not in results.setdefault("commands", []):  # every command that added runs
            results["commands"].append(command)
        write_json(results_path, results)
        seconds = results["runs"][key]["seconds"]
        print(f"{key}: done in {sum(v for k, v in seconds.items() if k != 'step_median'):.0f} s "
              f"(median step {seconds['step_median']:.3f} s)", flush=True)  # fmt: skip
    write_json(results_path, results)
    report.write_report(results, args.output_dir)
    print(f"Results: {results_path}, {args.output_dir / 'results.md'} ({time.perf_counter() - started:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
