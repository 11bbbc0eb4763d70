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

# ----------------------------------------------------------- every causal-LM family of the installed transformers

# Sizes set on every registry family whose default config has the field (1 layer; distinct sizes, so that a merged
# config field is found by its value and no two FFN sizes are confused).
REGISTRY_SIZES = dict(
    hidden_size=32, n_embd=32, d_model=32, intermediate_size=48, n_inner=48, ffn_dim=48, ffn_hidden_size=48,
    num_hidden_layers=1, n_layer=1, num_layers=1, num_attention_heads=4, n_head=4, num_key_value_heads=2,
    head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, n_positions=64, num_local_experts=4, num_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
)
# Family-specific tweaks (sizes that must divide, features a 1-layer model cannot have).
REGISTRY_TWEAKS = {
    "gptj": dict(rotary_dim=4),
    "gpt_neox": dict(rotary_pct=0.25),
    "codegen": dict(rotary_dim=4),
    # a composite config, set field by field: its per-layer list keeps the default depth (48) and fails validation
    # when the config is saved; llama4_text builds its own from num_hidden_layers
    "llama4": dict(layer_types=["chunked_attention"]),
}


MAX_TINY_PARAMETERS = 2_000_000


def registry_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_registry_model(model_type: str, seed: int = 0):
    """A 1-layer random model of a registry family, sizes from REGISTRY_SIZES where its config has the field."""
    default = AutoConfig.for_model(model_type)
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    sizes = {k: v for k, v in REGISTRY_SIZES.items() if k in vars(text)}
    overrides = {**sizes, **REGISTRY_TWEAKS.get(model_type, {})}
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, token, None) is not None:
            overrides[token] = 1
    config = AutoConfig.for_model(model_type, **overrides) if text is default else default
    if text is not default:
        for key, value in overrides.items():
            setattr(text, key, value)
    with torch.device("meta"):  # count first: a family that ignores these sizes can be gigabytes
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"{size:,} parameters at these sizes (its config ignores them)")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def built_registry_model(model_type: str):
    """``(model, its logits, the input ids)``: a family counts as built when its tiny model runs a forward pass."""
    ids = random_ids(batch=1, length=6, vocab=VOCAB)
    model = tiny_registry_model(model_type)
    with torch.no_grad():
        return model, model(ids).logits, ids


def check_family_end_to_end(model_type: str, peft_config, tmp_path) -> None:
    """The whole life of an adapter on one registry family, asserted step by step: the base logits at init, one
    optimizer step changes them, ``disable_adapter`` restores them, save/load round-trips, and ``merge_and_unload``
    gives a checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads without peft, with the same logits."""
    from peft import PeftModel, get_peft_model

    model, base, ids = built_registry_model(model_type)
    peft_model = get_peft_model(model, peft_config)
    with torch.no_grad():
        assert (peft_model(ids).logits - base).abs().max() <= 1e-5, "not the base logits at init"
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    peft_model(ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params), "no adapter parameter got a gradient"
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(ids).logits
        assert not torch.equal(trained, base), "one optimizer step did not change the logits"
        with peft_model.disable_adapter():
            assert (peft_model(ids).logits - base).abs().max() <= 1e-5, "disable_adapter did not restore the base"
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_registry_model(model_type), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (loaded(ids).logits - trained).abs().max() <= 1e-5, "save/load changed the logits"
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("scale_" in name or "lora_" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        assert (plain(ids).logits - trained).abs().max() <= 1e-4, "the merged checkpoint's logits differ"


# ------------------------------------------------------------------ the learned router on a registry family (tiny)


def routed_registry_model(model_type: str, router_steps: int = 60, **router):
    """``(base, routed, old, new)``: a tiny registry family (``tiny_registry_model``) and a copy routed by
    ``ScaleConfig(ffn_expansion=8, router=RouterConfig(**router))``, fitted on two token ranges (``old``: ids
    4-63, ``new``: ids 64-127, 32 rows of 12) with ``router_steps`` training steps (a fifth of ``fit_router``'s: these
    routers tell embeddings apart well within them), its expansion moved by seeded noise; both in eval mode."""
    from unittest import mock

    from peft import get_peft_model

    import peft_scale
    import peft_scale.router_fitting

    generator = torch.Generator().manual_seed(0)
    old, new = (torch.randint(low, high, (32, 12), generator=generator) for low, high in ((4, VOCAB // 2), (VOCAB // 2, VOCAB)))
    config = peft_scale.ScaleConfig(ffn_expansion=8, router=peft_scale.RouterConfig(**router))
    routed = get_peft_model(tiny_registry_model(model_type), config)
    with mock.patch.object(peft_scale.router_fitting, "ROUTER_STEPS", router_steps):
        peft_scale.fit_router(routed, new, old, progress=False)
    perturb_adapter(routed, scale=0.5)
    return tiny_registry_model(model_type), routed.eval(), old, new


def switching_rows(old: torch.Tensor, new: torch.Tensor, length: int = 6) -> torch.Tensor:
    """Two rows that switch domain halfway: new then old (where the preservation copy matters), old then new."""
    return torch.cat([torch.cat([new[:1, :length], old[:1, :length]], 1), torch.cat([old[1:2, :length], new[1:2, :length]], 1)])


def assert_base_routed_tokens_exact(base, routed, ids: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """The tokens of ``ids`` that ``routed``'s router sends to the base model get ``base``'s logits (within
    ``atol``), and the others do not; both kinds occur. Returns the routed logits."""
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        got = routed(input_ids=ids).logits
    to_base = routed.base_model.last_routing.to_preservation
    assert to_base.shape == ids.shape and to_base.any() and (~to_base).any(), to_base
    assert (got - expected)[to_base].abs().max() <= atol, "tokens routed to the base model drifted"
    assert (got - expected)[~to_base].abs().max() > 1e-4, "the expansion changed nothing"
    return got
