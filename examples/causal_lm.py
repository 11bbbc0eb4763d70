"""The model and tokenizer an example trains: any causal LM by path or Hub id, the bundled SmolLM2-135M by default, or
a tiny random Llama for smoke tests (``--tiny``)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bundled import load_smollm2, load_smollm2_tokenizer

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
