"""Tiny random-weight models of every architecture with a built-in FFN layout (seconds to build)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

# model_type -> config kwargs (hidden 32, 2 layers, FFN 64 where the family lets us choose it)
TINY_CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma3_text": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
    ),
    "olmo2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # Granite's four multipliers away from 1, so that a widening that mishandled any of them would show
    "granite": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
    ),
    "stablelm": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "starcoder2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "phi3": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
    "gpt2": dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False),
}


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, experts_implementation=None, **overrides):
    """A tiny random model of ``model_type`` (see TINY_CONFIGS and TINY_MOE_CONFIGS), in eval mode; ``overrides``
    change its config."""
    torch.manual_seed(seed)
    sizes = TINY_CONFIGS[model_type] if model_type in TINY_CONFIGS else TINY_MOE_CONFIGS[model_type]
    implementation = {"experts_implementation": experts_implementation} if experts_implementation else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **{**sizes, **overrides},
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype, **implementation).eval()


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with random weights (hidden 32, FFN 64, vocab 128), in eval mode."""
    return tiny_model("llama", seed=seed, **overrides)


def random_ids(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def perturb_adapter(model, adapter_name: str = "default", seed: int = 0, scale: float = 0.1) -> None:
    """Stand-in for training: move every SCALE parameter of one adapter by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".scale_" in name and name.endswith(f".{adapter_name}"):
                param.add_(torch.randn(param.shape, generator=generator) * scale)



# Mixture-of-experts families whose experts are fused 3-D parameters (peft_scale.experts): 1 layer, 4 experts of
# intermediate size 24 (Qwen2-MoE: 16, so that 2I = D and only the declared layout tells the orientation), top-2.
# gpt-oss stores them transposed, gate/up interleaved, with biases; Dots1 derives its shared experts' size from the
# experts'. (Not in TINY_CONFIGS: no FFN_LAYOUTS row.)
_MOE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
TINY_MOE_CONFIGS = {
    "mixtral": dict(_MOE, num_local_experts=4, intermediate_size=24),
    "qwen2_moe": dict(_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32, intermediate_size=48),
    "gpt_oss": dict(_MOE, num_local_experts=4, intermediate_size=24, head_dim=8, layer_types=["full_attention"]),
    # shared experts sized moe_intermediate_size * n_shared_experts
    "dots1": dict(
        _MOE, n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=0, head_dim=8,
        intermediate_size=48,
    ),
}
