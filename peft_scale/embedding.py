"""The token embedding widened with new feature columns."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layer import INIT_ROWS, ScaleTunerLayer


class Embedding(nn.Module, ScaleTunerLayer):
    """``E -> [E, E_up]``: every token gets ``d_up`` new features next to its frozen embedding.

        out = [ E[ids] ; E_up[ids] ]

    ``E_up`` (``scale_embedding``, ``vocab x d_up``) starts non-zero: it is where the new slice of the residual
    stream comes from. With ``init="svd"`` its columns are drawn like ``init_rows_svd`` draws new rows, from the
    principal subspace of ``E``'s columns at their scale, so each new feature is distributed over the vocabulary
    like an existing one. The frozen ``E`` is untouched, so a tied LM head keeps its weight.

    A scaled embedding (Gemma's ``embed_scale``, ``sqrt(hidden_size)`` of the base config, which widening leaves
    as it is) scales the new columns by the same factor: ``[E[ids] s ; E_up[ids] s]``, so they enter the stream at
    the scale of the old ones, and the merged ``[E, E_up]`` is scaled as one matrix.
    """

    adapter_layer_names = ("scale_embedding",)
    other_param_names = ("expansion",)

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, expansion: int, init: str = "svd", **kwargs):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"ScaleEmbedding widens nn.Embedding, got {type(base_layer).__name__}.")
        self._init_tuner_state(base_layer, adapter_name)
        self.scale_embedding = nn.ParameterDict()
        self.expansion: dict[str, int] = {}
        self.update_layer(adapter_name, expansion, init, **kwargs)

    def update_layer(
        self, adapter_name: str, expansion: int, init: str = "svd", init_weights: bool = True, inference_mode=False
    ) -> None:
        # E_up never starts at zero, so init_weights (which draws the zero blocks of the other modules) changes nothing
        # here: it is accepted so that every SCALE module takes the same arguments from the config.
        weight = self.base_layer.weight
        self.scale_embedding[adapter_name] = nn.Parameter(
            torch.empty(weight.shape[0], expansion, device=weight.device, dtype=weight.dtype)
        )
        self.expansion[adapter_name] = expansion
        new = self.scale_embedding[adapter_name]
        if self._materialised(new):
            with torch.no_grad():
                new.copy_(INIT_ROWS[init](weight.T, expansion).T)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(ids, *args, **kwargs)  # merged: [E, E_up][ids] already
        active = self._active_scale_adapters()
        if self.disable_adapters or self.merged or not active:
            return result
        new = [F.embedding(ids, self.scale_embedding[name]).to(result.dtype) for name in active]
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is not None:  # as the base scales E[ids]
            new = [columns * scale.to(columns.dtype) for columns in new]
        return torch.cat([result, *new], dim=-1)  # (..., d + d_up)

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        """One embedding of width ``d + d_up``: ``[E, E_up_a, ...]``, of the base's own class (Gemma's scaled
        embedding keeps its scale)."""
        base = self._pretrained_layer()
        dtype = base.weight.dtype
        weight = torch.cat([base.weight, *[self.scale_embedding[name].to(dtype) for name in adapter_names]], dim=1)
        if type(base) is nn.Embedding:
            merged = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=base.padding_idx, device="meta")
        else:  # a copy sharing everything but E
            merged = copy.copy(base)
            merged._parameters, merged._buffers = dict(merged._parameters), dict(merged._buffers)
            merged._modules = dict(merged._modules)
            merged.embedding_dim = weight.shape[1]
        merged.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return merged


# The name before 0.2, kept for user code, the tests and pickled modules (see ``layer.ScaleLayer``).
ScaleEmbedding = Embedding
