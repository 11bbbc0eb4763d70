"""Per-architecture knowledge: where each family keeps its FFN projections.

An FFN is ``down(act(gate(x)) * up(x))`` or ``out(act(in(x)))``. SCALE widens it from the intermediate
size ``I`` to ``I + ffn_expansion``: every *input projection* (reads the residual stream, writes the
intermediate activations) gets new output rows, and the one *output projection* (reads the intermediate
activations) gets new input columns. The activation between them is elementwise, so the wider tensor
flows through the model's own MLP code untouched.

This table is the only place that knows module names. To support a new family, add one row (see
CONTRIBUTING.md); for a one-off model, pass the same three facts through ``ScaleConfig``
(``target_modules``, ``ffn_output_modules``, ``ffn_fused_modules``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class FfnLayout:
    """Names of one family's FFN projections, as suffixes of module names.

    Args:
        input_modules: projections that read the residual stream and produce intermediate activations
            (``gate_proj``, ``up_proj``); SCALE adds output rows to them.
        output_module: the projection that reads the intermediate activations (``down_proj``); SCALE adds
            input columns to it.
        fused_modules: input projections that pack several projections side by side in their output, with the
            number of packed parts (Phi-3's ``gate_up_proj`` holds ``[gate; up]``: 2). New rows are added after
            each part so that the model's own ``chunk`` still splits them correctly.
        size_field: the config attribute holding the intermediate size, updated when a merged model is saved.
    """

    input_modules: tuple[str, ...]
    output_module: str
    fused_modules: dict[str, int] = field(default_factory=dict)
    size_field: str = "intermediate_size"

    @property
    def target_modules(self) -> list[str]:
        return [*self.input_modules, self.output_module]


_GATED = FfnLayout(input_modules=("gate_proj", "up_proj"), output_module="down_proj")

FFN_LAYOUTS: dict[str, FfnLayout] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "granite": _GATED,
    "olmo2": _GATED,
    "stablelm": _GATED,
    "starcoder2": FfnLayout(input_modules=("mlp.c_fc",), output_module="mlp.c_proj"),
    "phi3": FfnLayout(input_modules=("gate_up_proj",), output_module="down_proj", fused_modules={"gate_up_proj": 2}),
    # GPT-2's attention also has a `c_proj`: the `mlp.` prefix keeps it out.
    "gpt2": FfnLayout(input_modules=("mlp.c_fc",), output_module="mlp.c_proj", size_field="n_inner"),
    "gpt_neox": FfnLayout(input_modules=("mlp.dense_h_to_4h",), output_module="mlp.dense_4h_to_h"),
    "opt": FfnLayout(input_modules=("fc1",), output_module="fc2", size_field="ffn_dim"),
    "falcon": FfnLayout(
        input_modules=("mlp.dense_h_to_4h",), output_module="mlp.dense_4h_to_h", size_field="ffn_hidden_size"
    ),
}

@dataclass(frozen=True)
class DecoderLayout:
    """Where a family keeps the modules that read or write the residual stream (full-width SCALE).

    Args:
        embedding: the token embedding (gets ``d_up`` new columns).
        query, key, value: attention input projections (get whole new heads of the base head size; keys and
            values in the base group ratio).
        attention_output: the attention output projection (reads the new heads, writes ``d_up`` new features).
        norms: the norms of the residual stream inside each decoder layer, in front of a sublayer or (Gemma 2/3,
            OLMo 2) on its output before the residual addition: every one is split, the original slice keeping the
            base norm (RMSNorm, Gemma's ``1 + w`` RMSNorm or LayerNorm: ``peft_scale.norm``).
        final_norm: the norm in front of the LM head (split, and carries the LM head's new block ``P``).
        layers: the list of decoder layers (the cosine rule prepends its frozen slice at the input of one).
        input_norm: the first module of a decoder layer to read its input (the cosine rule checks it to know
            whether the layer carries the frozen slice): a norm, or a projection where the layer has no input norm.
        query_norm, key_norm: norms over the whole query / key projection (OLMo 2's ``q_norm``, ``k_norm``; not
            the per-head norms of Qwen 3 and Gemma 3, which act on ``head_dim`` and apply to new heads unchanged).
            Split like the others, by the new query / key-value features.
    """

    # "model.embed_tokens", not "embed_tokens": PEFT saves the whole (frozen) embedding matrix with the adapter
    # when the bare name is a target, which SCALE does not need (only its new columns are saved).
    embedding: str = "model.embed_tokens"
    query: str = "q_proj"
    key: str = "k_proj"
    value: str = "v_proj"
    attention_output: str = "o_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "model.norm"
    layers: str = "model.layers"
    input_norm: str = "input_layernorm"
    query_norm: Optional[str] = None
    key_norm: Optional[str] = None

    @property
    def head_norms(self) -> list[str]:
        return [name for name in (self.query_norm, self.key_norm) if name is not None]

    @property
    def target_modules(self) -> list[str]:
        return [
            self.embedding, self.query, self.key, self.value, self.attention_output, *self.norms, *self.head_norms,
            self.final_norm,
        ]  # fmt: skip


_LLAMA_DECODER = DecoderLayout()

# Gemma 2 and 3 also normalise each sublayer's output before the residual addition.
_GEMMA2_DECODER = DecoderLayout(
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
)

# Families whose whole decoder SCALE can widen (hidden_expansion > 0). Each entry also needs an FFN_LAYOUTS row.
# What each family adds to Llama's decoder, and why the split holds for it, is in the comments; the tests run every
# row (tests/test_full_width.py).
FULL_WIDTH_LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA_DECODER,
    "mistral": _LLAMA_DECODER,
    "qwen2": _LLAMA_DECODER,
    "qwen3": _LLAMA_DECODER,  # its per-head q_norm/k_norm act on head_dim and apply to new heads unchanged
    # Gemma: the embedding is scaled by sqrt(hidden_size) of the (unchanged) config, the new columns too; the norms
    # compute x (1 + w), and the split keeps that for the original slice.
    "gemma": _LLAMA_DECODER,
    # + attention and final-logit softcapping and query_pre_attn_scalar: per head or per logit, so elementwise.
    "gemma2": _GEMMA2_DECODER,
    "gemma3_text": _GEMMA2_DECODER,  # + per-head q_norm/k_norm, as Qwen 3
    # Granite's embedding, residual, attention and logit multipliers are scalars on whole tensors.
    "granite": _LLAMA_DECODER,
    # OLMo 2 has no input norms: it normalises each sublayer's output, and q/k over the whole projection width.
    "olmo2": DecoderLayout(
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        input_norm="self_attn.q_proj",
        query_norm="self_attn.q_norm",
        key_norm="self_attn.k_norm",
    ),
    # LayerNorm with biases, and biases in every projection.
    "starcoder2": _LLAMA_DECODER,
}

# Families SCALE cannot widen in full, and why (the error says it; FFN mode works on them).
# Families the learned router (RouterConfig) cannot route, with the reason: what it needs is a decoder layer whose
# input is the base model's stream, one row per (batch, token), as the model's input holds them.
LEARNED_ROUTE_REFUSED: dict[str, str] = {
    "hrm_text": (
        "HRM runs its decoder layers several times per forward pass (H_cycles x L_cycles recurrent cycles), so "
        "from the second cycle on every layer's input is the output of widened layers: no layer's input is the base "
        "model's stream for the router to read"
    ),
    "xlnet": (
        "XLNet's layers take the sequence first, (seq, batch, features), and two streams (content and query), while "
        "the router's decisions, their smoothing along the sequence and the preservation copy's stacked rows are "
        "per (batch, seq)"
    ),
    "cpmant": (
        "CPM-Ant prepends prompt_length prompt positions of its own to every input inside the model, so its "
        "decoder layers see more positions than the input has tokens, and the router's decisions (and their "
        "smoothing) would not line up with the tokens"
    ),
}

FULL_WIDTH_REFUSED: dict[str, str] = {
    "phi3": (
        "Phi-3's attention splits its fused qkv_proj at offsets computed from the config's head counts "
        "(queries: the first num_attention_heads x head_dim features, keys: the next num_key_value_heads x "
        "head_dim, values: the rest), so new heads placed after each part would be read as the wrong projection, "
        "and changing the config would change the base model's own split"
    ),
    "stablelm": (
        "StableLM's attention reshapes its queries, keys and values into the config's number of heads "
        "(view(batch, length, num_heads, head_dim)), so a projection with new heads does not fit the reshape"
    ),
}

# Config attributes that hold the intermediate size in families outside the table, tried in this order when a
# model whose FFN was named by hand is merged.
INTERMEDIATE_SIZE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "dim_ff")


@dataclass(frozen=True)
class DerivedSize:
    """A family whose config holds not its FFN's intermediate size ``I`` but values its modeling code derives ``I``
    from: what a merge writes so that the family's own code builds the wider FFN.

    Args:
        size: the intermediate size the family's code builds from a config.
        fields: the config values that make the code build intermediate size ``I`` (``(config, I) -> {field:
            value}``), or ``None`` where no value of these fields gives ``I``.
        rule: how the code derives ``I``, for the error when ``fields`` gives ``None``.
    """

    size: Callable[[object], int]
    fields: Callable[[object, int], Optional[dict]]
    rule: str


def _lfm2_size(config) -> int:
    """``Lfm2MLP``: ``I`` itself, or with ``block_auto_adjust_ff_dim`` 2/3 of it, times ``block_ffn_dim_multiplier``
    and rounded up to ``block_multiple_of``."""
    size = config.intermediate_size
    if config.block_auto_adjust_ff_dim:
        size = int(2 * size / 3)
        if config.block_ffn_dim_multiplier is not None:
            size = int(config.block_ffn_dim_multiplier * size)
            size = config.block_multiple_of * ((size + config.block_multiple_of - 1) // config.block_multiple_of)
    return size


# model_type -> DerivedSize, each read from the family's modeling code in transformers 5.25. The merge then checks
# it: the merged config must build exactly the merged model's shapes (``merge.refuse_unloadable_checkpoint``).
# BLOOM, MPT and OpenAI GPT are not here: their MLPs are 4 x hidden_size in code, which no config field changes.
DERIVED_SIZES: dict[str, DerivedSize] = {
    "lfm2": DerivedSize(
        size=_lfm2_size,
        fields=lambda config, size: {"intermediate_size": size, "block_auto_adjust_ff_dim": False},
        rule="intermediate_size, taken as it is when block_auto_adjust_ff_dim is off",
    ),
    # MoshiGatingMLP: fc1 writes ffn_dim features, [gate; up], and fc2 reads ffn_dim // 2.
    "moshi": DerivedSize(
        size=lambda config: config.ffn_dim // 2,
        fields=lambda config, size: {"ffn_dim": 2 * size},
        rule="ffn_dim = 2 x I (the packed gate and up projection)",
    ),
    # GPTNeoXJapaneseMLP: int(hidden_size * intermediate_multiple_size), and the field is an int.
    "gpt_neox_japanese": DerivedSize(
        size=lambda config: int(config.hidden_size * config.intermediate_multiple_size),
        fields=lambda config, size: (
            {"intermediate_multiple_size": size // config.hidden_size} if size % config.hidden_size == 0 else None
        ),
        rule="I = hidden_size x intermediate_multiple_size, an integer: the merged I must be a multiple of "
        "hidden_size (choose ffn_expansion a multiple of it)",
    ),
    # AriaSharedExpertsMLP: intermediate_size x moe_num_shared_experts (the routed experts: intermediate_size, widened
    # by as many neurons per expert: FFN_EXPANSION_MULTIPLES).
    "aria_text": DerivedSize(
        size=lambda config: config.intermediate_size * config.moe_num_shared_experts,
        fields=lambda config, size: (
            {"intermediate_size": size // config.moe_num_shared_experts}
            if size % config.moe_num_shared_experts == 0
            else None
        ),
        rule="the shared experts' MLP is intermediate_size x moe_num_shared_experts wide",
    ),
}


# MLPs that hold several experts' neurons side by side, and the config field that counts those experts: model_type ->
# {MLP module name suffix: field}. Every expert gets ``ffn_expansion`` new neurons, so such an MLP gets that many
# times more: the family's code builds it as (experts' size) x (count), and the merged config can then record it.
FFN_EXPANSION_MULTIPLES: dict[str, dict[str, str]] = {
    # AriaSharedExpertsMLP is intermediate_size x moe_num_shared_experts wide; each routed expert intermediate_size.
    "aria_text": {"mlp.shared_experts": "moe_num_shared_experts"},
}


def module_name_matches(key: str, names) -> bool:
    """PEFT's rule for a list of target names: the full name, or a suffix at a ``.`` boundary."""
    return any(key == name or key.endswith("." + name) for name in names)
