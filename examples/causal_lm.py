"""What the examples share: the model and tokenizer they train (any causal LM by path or Hub id, the bundled
SmolLM2-135M by default, or a tiny random Llama for smoke tests with ``--tiny``), their common command-line flags
and the SCALE config those flags describe."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bundled import load_smollm2, load_smollm2_tokenizer
from peft_scale import RouterConfig, ScaleConfig

# --tiny: a 2-layer Llama of width 64 (4 heads of 16, 2 key-value heads), random weights, SmolLM2's tokenizer.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_llama_for(tokenizer, seed: int = 0):
    """A tiny random Llama with ``tokenizer``'s vocabulary and special tokens (seconds to build)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_LLAMA,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_causal_lm(model: str | None = None, tiny: bool = False):
    """(model, tokenizer): ``model`` (a local folder or Hub id) if given, else the bundled SmolLM2-135M-Instruct;
    with ``tiny``, a tiny random Llama with SmolLM2's tokenizer instead (``model`` must then be None)."""
    if tiny:
        if model is not None:
            raise ValueError("--tiny builds its own tiny random model; leave --model out.")
        tokenizer = load_smollm2_tokenizer()
        return tiny_llama_for(tokenizer), tokenizer
    if model is None:
        return load_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; padded positions are masked out anyway
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), tokenizer


# ------------------------------------------------------------------------------ command line shared by the examples


def add_common_arguments(parser: argparse.ArgumentParser, max_steps: int, tiny_defaults: dict):
    """The flags every example has: the model (``--model``, ``--tiny``), the SCALE adapter and the basic training
    loop. Returns the "training" argument group, for the example's own training flags."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="causal LM folder or Hub id (default: the bundled SmolLM2-135M)")
    model.add_argument("--tiny", action="store_true", help=f"smoke test on a tiny random Llama: {tiny_defaults}")
    scale = parser.add_argument_group("SCALE")
    scale.add_argument("--ffn-expansion", type=int, default=256, help="new neurons per MLP")
    scale.add_argument("--hidden-expansion", type=int, default=0, help="new residual features (full width)")
    scale.add_argument("--variant", choices=("preserve", "adapt", "route"), default="adapt")
    scale.add_argument(
        "--route-rule", choices=("learned", "cosine"), default="learned",
        help="route: a router fitted before training (learned) or the paper's rule (cosine, full width only)",
    )
    scale.add_argument("--preserve-layers", type=int, default=0, help="bottom layers whose W12 stay zero")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step and process")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the paper's for SCALE)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output-dir", type=Path, default=None, help="save the adapter (and its model card) here")
    return train


def parse_args_with_tiny_defaults(parser: argparse.ArgumentParser, argv, tiny_defaults: dict) -> argparse.Namespace:
    """Parse; with ``--tiny``, parse again over ``tiny_defaults`` so that flags given explicitly still win."""
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**tiny_defaults)
        args = parser.parse_args(argv)
    return args


def scale_config_from_args(args: argparse.Namespace) -> ScaleConfig:
    """The adapter's config; a learned route gets ``RouterConfig``'s defaults, its seed the example's."""
    learned = args.variant == "route" and args.route_rule == "learned"
    return ScaleConfig(
        ffn_expansion=args.ffn_expansion,
        hidden_expansion=args.hidden_expansion,
        variant=args.variant,
        route_rule=args.route_rule,
        router=RouterConfig(seed=args.seed) if learned else None,
        preserve_layers=args.preserve_layers,
        task_type="CAUSAL_LM",
    )


def needs_router(config: ScaleConfig) -> bool:
    """Whether the adapter routes with a learned router, which ``peft_scale.fit_router`` fits before training."""
    return config.router is not None
