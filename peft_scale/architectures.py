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
        norms: the RMSNorms inside each decoder layer (split: the original slice keeps the base norm).
        final_norm: the norm in front of the LM head (split, and carries the LM head's new block ``P``).
        layers: the list of decoder layers (SCALE-Route adds the preservation copy at the input of one).
        input_norm: the first module of a decoder layer to read its input (SCALE-Route checks it to know whether
            the layer carries a preservation copy).
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

    @property
    def target_modules(self) -> list[str]:
        return [self.embedding, self.query, self.key, self.value, self.attention_output, *self.norms, self.final_norm]


_LLAMA_DECODER = DecoderLayout()

# Families whose whole decoder SCALE can widen (hidden_expansion > 0). Each entry also needs an FFN_LAYOUTS row.
FULL_WIDTH_LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA_DECODER,
    "mistral": _LLAMA_DECODER,
    "qwen2": _LLAMA_DECODER,
    "qwen3": _LLAMA_DECODER,  # its per-head q_norm/k_norm act on head_dim and apply to new heads unchanged
}

# Config attributes that hold the intermediate size in families outside the table, tried in this order when a
# model whose FFN was named by hand is merged.
INTERMEDIATE_SIZE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")


def module_name_matches(key: str, names) -> bool:
    """PEFT's rule for a list of target names: the full name, or a suffix at a ``.`` boundary."""
    return any(key == name or key.endswith("." + name) for name in names)
