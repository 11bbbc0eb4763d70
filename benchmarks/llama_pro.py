"""LLaMA Pro depth expansion (Wu et al., 2024), the depth-wise baseline the SCALE paper compares against.

Not part of the library: a baseline for ``benchmarks/`` only.

LLaMA Pro splits the ``L`` decoder layers into ``P`` groups of ``L / P`` and, after each group, inserts a copy of
the group's last block whose output projections (attention ``o_proj`` and MLP ``down_proj``) are zero. A block
adds ``attention(x) + mlp(x)`` to the residual stream, so a copy with both output projections at zero adds
nothing: the expanded model computes exactly what the base model computes ("identity initialisation"). Only the
inserted blocks train; every original weight is frozen. Once the new blocks train, their outputs move the
residual stream that every later original layer reads, which is where depth expansion forgets.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["expand_depth", "inserted_block_indices"]


def inserted_block_indices(num_layers: int, num_blocks: int) -> list[int]:
    """Positions, in the expanded layer list, of the inserted copies (one after every ``num_layers / num_blocks``).

    Example: 4 layers, 2 blocks -> ``[0, 1, new, 2, 3, new]`` -> ``[2, 5]``.
    """
    if num_blocks < 1 or num_layers % num_blocks != 0:
        raise ValueError(
            f"LLaMA Pro inserts one copied block after every num_layers / num_blocks layers, so num_blocks must be a "
            f"positive divisor of the model's {num_layers} layers (got num_blocks={num_blocks})."
        )
    group = num_layers // num_blocks
    return [(i + 1) * (group + 1) - 1 for i in range(num_blocks)]


def _zero_output_projections(block: nn.Module) -> None:
    """Zero the two projections that write into the residual stream: the block becomes the identity map."""
    for module in (block.self_attn.o_proj, block.mlp.down_proj):
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def expand_depth(model: nn.Module, num_blocks: int) -> nn.Module:
    """Insert ``num_blocks`` identity-initialised copies of decoder blocks into a Llama-family causal LM, in place.

    Only the inserted blocks are left trainable (``requires_grad``); the embedding, the original blocks, the final
    norm and the LM head are frozen. ``config.num_hidden_layers`` and every attention's ``layer_idx`` are
    renumbered, so the KV cache gives each layer (new ones included) its own slot and ``generate`` works.

    Returns the same ``model``.
    """
    decoder = model.model
    layers = decoder.layers
    num_layers = len(layers)
    new_positions = set(inserted_block_indices(num_layers, num_blocks))

    for param in model.parameters():
        param.requires_grad_(False)

    expanded, sources = [], []  # sources[i]: index of the original layer that block i is (or copies)
    originals = iter(enumerate(layers))
    for position in range(num_layers + num_blocks):
        if position in new_positions:
            block = copy.deepcopy(expanded[-1])  # the copy of the block just below (the group's last)
            _zero_output_projections(block)
            for param in block.parameters():
                param.requires_grad_(True)
            source = sources[-1]
        else:
            source, block = next(originals)
        expanded.append(block)
        sources.append(source)

    decoder.layers = nn.ModuleList(expanded)
    for index, block in enumerate(decoder.layers):
        block.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(decoder.layers)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:  # per-layer attention kinds (sliding/full): a copy takes its source's kind
        model.config.layer_types = [layer_types[source] for source in sources]
    return model
