"""The SCALE block-expanded linear layer around a frozen ``nn.Linear`` / ``Conv1D``, and its merged form (``widened_copy``)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantized import adapter_dtype, bnb_kind, check_layer, quantized_like, weight_rows, weight_shape
from .cosine_routing import mode_applies
from .route_decisions import NO_GATES
from .widened_linear import widened_linear


def init_rows_svd(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """New rows in the principal input subspace of ``weight``, scaled by its singular values.

    With ``weight = U diag(s) Vᵀ`` (``n`` rows) and ``r = min(num_rows, rank)``, the new rows are

        W21 = G diag(s_1..s_r) V_rᵀ / sqrt(n),     G ~ N(0, 1)^{num_rows x r}.

    Why: each new neuron then reads the input directions the existing neurons read most strongly, at their
    scale: ``E[w wᵀ] = V_r diag(s_r²) V_rᵀ / n``, the top-``r`` part of the existing rows' second moment
    ``Wᵀ W / n``. So the new neurons' pre-activations have the statistics of the old ones on any input and
    the new neurons start as plausible neurons of this layer, not as noise at an arbitrary scale, while
    the random mixing ``G`` keeps them distinct from each other and from the old ones. When ``num_rows``
    reaches the rank, ``W21`` is drawn from exactly ``N(0, Wᵀ W / n)``, which is computed as ``G' W / sqrt(n)``
    with ``G' ~ N(0, 1)^{num_rows x n}`` (the same distribution without an SVD). Otherwise the top-``r``
    subspace comes from an exact SVD, or, for a large matrix (rank above 1024) whose ``r`` is small next to the
    rank (below a quarter of it, after oversampling), from a randomized SVD (``torch.svd_lowrank``, ``O(n d r)``
    instead of ``O(n d min(n, d))``).
    """
    w = weight.detach().float()
    n_rows, n_cols = w.shape
    rank = min(n_rows, n_cols)
    r = min(num_rows, rank)
    if r == rank:
        return torch.randn(num_rows, n_rows, device=w.device) @ w / math.sqrt(n_rows)
    oversampled = 2 * r + 10
    if rank <= 1024 or 4 * oversampled >= rank:
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.T
    else:
        _, s, v = torch.svd_lowrank(w, q=oversampled, niter=8)  # v: (n_cols, oversampled)
    return (torch.randn(num_rows, r, device=w.device) * s[:r]) @ v[:, :r].T / math.sqrt(n_rows)


def init_rows_normal(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """New rows with i.i.d. normal entries at the base weight's entry standard deviation."""
    w = weight.detach().float()
    return torch.randn(num_rows, w.shape[1], device=w.device) * w.std()


INIT_ROWS = {"svd": init_rows_svd, "normal": init_rows_normal}


@torch.no_grad()
def init_like_linear(block: Optional[torch.Tensor], fan_in: int) -> None:
    """``ScaleConfig(init_weights=False)``: a block that starts at zero drawn instead as torch draws the weight and bias
    of a fresh ``nn.Linear`` with ``fan_in`` inputs, uniform in ``±1/sqrt(fan_in)`` (and as PEFT draws LoRA's ``B``
    with ``init_lora_weights=False``)."""
    if block is not None and ScaleTunerLayer._materialised(block):
        bound = fan_in**-0.5
        block.uniform_(-bound, bound)


class ScaleTunerLayer(BaseTunerLayer):
    """What every SCALE module is and shares (``Linear`` here, ``norm.RMSNorm``, ``embedding.Embedding``), as PEFT's
    ``LoraLayer`` is for ``lora.Linear`` and the rest: PEFT switches, deletes and freezes adapters on the modules of the tuner's
    ``tuner_layer_cls``, and all three must follow together.

    It holds the tuner state they all set up (``_init_tuner_state``), which of the active adapters this module holds
    (``_active_scale_adapters``: the keys of its per-adapter ``_widths_attr`` dict), whether the stream carries a
    frozen slice (cosine rule), the split of the widened stream ``[x_pres; x; x_up_a; x_up_b; ...]`` with its width check
    (``_check_stream``, ``_split_stream``), and the guard for parameters still on the meta device.
    """

    _widths_attr = "expansion"  # the per-adapter dict whose keys are the adapters this module holds
    _kind = "layer"  # what the module is called in the width-mismatch error

    def _init_tuner_state(self, base_layer: nn.Module, adapter_name: str) -> None:
        """The state PEFT's ``BaseTunerLayer`` reads, and the router's gates (set by ``ScaleModel``)."""
        self.base_layer = base_layer
        self.route_gates = NO_GATES  # the ScaleModel's RouteGates: the learned routers' decisions in this forward pass
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        # While merged, `base_layer` is the merged module and the pre-trained layer waits here (a plain list, so that
        # it is neither saved with the adapter nor counted twice in `parameters()`).
        self._unmerged_base_layer: list[nn.Module] = []

    def _active_scale_adapters(self) -> list[str]:
        """The active adapters that have blocks in this module (another adapter may widen other modules only)."""
        widths = getattr(self, self._widths_attr)
        return [name for name in self.active_adapters if name in widths]

    def _mode_applies(self, modes: dict[str, str]) -> bool:
        """Whether the first active adapter's mode (``"off"`` / ``"eval"`` / ``"always"``) applies now."""
        active = self._active_scale_adapters()
        if self.disable_adapters or not active:
            return False
        return mode_applies(modes[active[0]], self.training)

    def carries_frozen_slice(self) -> bool:
        """Whether the input holds the cosine rule's frozen slice ``[x_pres; x; x_up]`` (SCALE-Route, cosine rule,
        routed layers: ``peft_scale.cosine_routing``)."""
        return self._mode_applies(getattr(self, "frozen_slice", {}))

    def _check_stream(self, x: torch.Tensor, original: int, copy: bool, new: dict[str, int]) -> list[int]:
        """The widths of ``[x_pres; x; x_up_a; ...]`` (``new``: adapter -> width of its ``x_up``), checked against
        ``x``.

        Raises:
            RuntimeError: ``x`` has another width: the model's modules disagree on which adapters are active.
        """
        widths = [original] * (2 if copy else 1) + list(new.values())
        if x.shape[-1] != sum(widths):
            raise RuntimeError(
                f"SCALE {self._kind} expected {sum(widths)} input features ({original} original"
                f"{' + a frozen slice' if copy else ''} + {new} new) but got {x.shape[-1]}: the layers of one "
                "block disagree on which adapters are active. Switch adapters on the whole model "
                "(model.set_adapter), not on single layers."
            )
        return widths

    @staticmethod
    def _split_stream(
        x: torch.Tensor, widths: list[int], copy: bool
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """``[x_pres; x; x_up_a; ...]`` (``widths`` from ``_check_stream``) -> ``(x_pres or None, x, [x_up_a, ...])``.

        ``x_pres`` and ``x`` come back contiguous: a column slice is strided, and the matmul kernels round it
        differently from the base model's contiguous input (and ``Conv1D``'s ``.view()`` refuses it), so one copy
        keeps the original output bit-exact. An input that is not widened is returned as it is, with zero-width
        ``x_up``s.
        """
        if sum(widths) == widths[0]:
            return None, x, [x[..., :0]] * (len(widths) - 1)
        pieces = x.split(widths, dim=-1)
        preserved = pieces[0].contiguous() if copy else None
        pieces = pieces[1:] if copy else pieces
        return preserved, pieces[0].contiguous(), list(pieces[1:])

    # ------------------------------------------------------------------------------------------- merging
    # Every SCALE module merges the same way: the merged module (wider, or a split norm) replaces `base_layer`, and
    # unmerging swaps the pre-trained layer back: exact, bit for bit, whatever the merge did. Each module says only
    # what its merged form is (`_merged_module`).

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        """The pre-trained layer with the blocks of ``adapter_names`` (in this order) folded in."""
        raise NotImplementedError

    def _pretrained_layer(self) -> nn.Module:
        """The frozen layer this module wraps, merged or not."""
        return self._unmerged_base_layer[0] if self.merged else self.base_layer

    def _adapters_to_merge(self, adapter_names: Optional[list[str]], safe_merge: bool) -> list[str]:
        """Of ``adapter_names`` (default: the active ones), those this module holds and has not merged yet
        (PEFT's ``check_adapters_to_merge`` warns about the others), each checked finite with ``safe_merge``."""
        widths = getattr(self, self._widths_attr)
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in widths]
        if safe_merge:
            for name in names:
                self.check_finite(name)
        return names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Swap in the merged module (the shapes change); the pre-trained layer comes back with ``unmerge()``.

        Adapters merged earlier stay merged: the merged module is rebuilt from the pre-trained layer with all of
        them, in the order they were merged (the order of their features in the stream).

        Raises:
            ValueError: ``safe_merge`` and an adapter's blocks are not finite (the layer is left as it was).
        """
        names = self._adapters_to_merge(adapter_names, safe_merge)
        if not names:
            return
        merged = self._merged_module(self.merged_adapters + names)
        if not self.merged:
            self._unmerged_base_layer.append(self.base_layer)
        self.base_layer = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.base_layer = self._unmerged_base_layer.pop()
        self.merged_adapters = []

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """What ``merge_and_unload`` (the merged module) or ``unload`` (the pre-trained layer) puts in its place."""
        if not merge:
            return self._pretrained_layer()
        names = self.merged_adapters + self._adapters_to_merge(adapter_names, safe_merge)
        return self._merged_module(names) if names else self._pretrained_layer()

    def check_finite(self, adapter_name: str) -> None:
        """``safe_merge``: every block of the adapter is finite (a merged SCALE module holds the blocks as they are,
        so its merged weights are finite exactly when they are).

        Raises:
            ValueError: PEFT's words (callers match on them), with what SCALE knows after them.
        """
        for container in self.adapter_layer_names:
            blocks = getattr(self, container)
            if adapter_name not in blocks:
                continue
            block = blocks[adapter_name]
            tensors = block.parameters() if isinstance(block, nn.Module) else [block]
            if not all(torch.isfinite(t).all() for t in tensors):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: its SCALE "
                    f"block {container} holds NaN or inf values (e.g. from a diverged training run), so nothing was "
                    "merged. Merge an earlier checkpoint of the adapter, or retrain it."
                )

    @staticmethod
    def _materialised(tensor: torch.Tensor) -> bool:
        """False on the meta device (``low_cpu_mem_usage``): the values come from a checkpoint, nothing to draw."""
        return tensor.device.type != "meta"


class Linear(nn.Module, ScaleTunerLayer):
    """A frozen linear map ``y = W x + b`` widened by SCALE blocks.

    The layer computes the block matrix over the original features ``x`` and the new features ``x_up``::

        [ y    ]   [ W    W12 ] [ x    ]        y    = W x + b + W12 x_up
        [ y_up ] = [ W21  W22 ] [ x_up ]        y_up = W21 x + b21 + W22 x_up

    - ``W`` (and ``b``) is the pre-trained ``base_layer``: frozen, never copied or modified.
    - ``W12`` (``scale_w12``, ``out x in_expansion``) is the only path from new features to the original
      output. It starts at zero, so the layer's original output is exactly the base layer's until training
      moves it.
    - ``W21`` (``scale_w21``, ``out_expansion x in``) and ``b21`` (``scale_b21``, when the base has a bias)
      produce new output features from the original ones. ``W21`` must not start at zero: with ``W12`` also
      zero, no gradient would ever reach either (see ``init_rows_svd``). ``b21`` starts at zero.
    - ``W22`` (``scale_w22``) maps new features to new features, when both sides are widened.
    - An absent block is a zero block. A variant that keeps ``W12`` frozen at zero (SCALE-Preserve, and the
      bottom ``preserve_layers`` of SCALE-Adapt/-Route) simply does not create it (``open_w12=False``).

    In FFN mode the input projections (``gate``/``up``) have only ``W21`` (their output is widened) and the
    output projection (``down``) has only ``W12`` (its input is widened).

    SCALE-Route with the learned rule gates ``W12`` per token (``route_gated[adapter]``): ``y = W x + b + g W12 x_up``
    with ``g`` the router's gate for the token (0/1, or in ``[0, 1]`` with ``RouterConfig(gate="soft")``;
    ``peft_scale.gate_hook``). A token routed to the base model (``g = 0``) gets exactly the base layer's output and
    gives ``W12`` (and, through it, the expansion) no gradient.

    With several active adapters, the input is ``[x; x_up_a; x_up_b; ...]`` and the new outputs follow the
    original ones in the same order.

    With one active adapter on a plain frozen ``nn.Linear`` (the common case), the whole block matrix runs as one
    autograd node with a hand-written backward (``peft_scale.widened_linear.WidenedLinear``: the same products, with
    fewer operations in the backward pass than autograd records op by op); every other case takes the general path of
    ``forward``, op by op.

    On a bitsandbytes 4-bit or 8-bit base (``peft_scale.quantized``), ``W x + b`` is the quantized layer itself,
    called as it is (the general path), so the original output is exactly the quantized model's; the sizes come
    from the layer's features, ``W21`` is initialised from the dequantised ``W``, and the new blocks are fp32.

    SCALE-Route with the cosine rule carries a *frozen slice* ``x_pres``, a copy of the original features, in front
    of the stream, ``[x_pres; x; x_up]``, in the layers where its adaptation path may differ from the base model
    (``peft_scale.cosine_routing``). Only the frozen base layer touches it: the output is ``[W x_pres + b; y; y_up]``.
    ``frozen_slice[adapter]``
    says when the layer expects it: ``"off"``, ``"eval"`` (when not training: routing at evaluation and
    generation) or ``"always"``. An output made of ``out_parts`` packed projections (Phi-3's ``[gate; up]``)
    gets its new rows after each part, ``[gate; gate_up_a; up; up_up_a]``, so the model's own ``chunk`` still
    splits it correctly.

    Args:
        base_layer: the frozen ``nn.Linear`` (or subclass: bitsandbytes' 4-bit and 8-bit layers too, see
            ``peft_scale.quantized``) or ``transformers`` ``Conv1D``.
        adapter_name: name of the first adapter.
        out_expansion: new output features per packed part (``W21`` rows).
        in_expansion: new input features (``W12`` columns).
        init: ``"svd"`` or ``"normal"``, the initialisation of ``W21``.
        out_parts: number of projections packed in the base output.
        init_weights: ``False`` draws ``W12`` and ``b21`` at random instead of zero (``ScaleConfig.init_weights``: for
            tests and debugging; the original output then changes from the start).

    Raises:
        TypeError: ``base_layer`` is not a ``Linear`` or ``Conv1D``, or its weight is quantized by something other
            than bitsandbytes.
        ValueError: the base output does not split into ``out_parts`` equal parts.
    """

    # scale_router: the learned router of a route adapter, held by the first module it gates (peft_scale.token_router)
    adapter_layer_names = ("scale_w12", "scale_w21", "scale_b21", "scale_w22", "scale_router")
    other_param_names = ("in_expansion", "out_expansion", "frozen_slice", "route_gated")
    _widths_attr = "out_expansion"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        out_expansion: int = 0,
        in_expansion: int = 0,
        init: str = "svd",
        out_parts: int = 1,
        open_w12: bool = True,
        frozen_slice: str = "off",
        route_gated: bool = False,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        check_layer(base_layer)
        self._init_tuner_state(base_layer, adapter_name)
        self.out_features, self.in_features = weight_shape(base_layer)  # of W, not of a quantized layer's packed weight
        if self.out_features % out_parts:
            raise ValueError(
                f"A projection with {self.out_features} outputs cannot hold {out_parts} packed projections of equal "
                "size; check `ffn_fused_modules`."
            )
        self.out_parts = out_parts
        self.scale_w12 = nn.ParameterDict()
        self.scale_w21 = nn.ParameterDict()
        self.scale_b21 = nn.ParameterDict()
        self.scale_w22 = nn.ParameterDict()
        self.scale_router = nn.ModuleDict()
        self.frozen_slice: dict[str, str] = {}
        self.route_gated: dict[str, bool] = {}
        self.in_expansion: dict[str, int] = {}
        self.out_expansion: dict[str, int] = {}
        self.update_layer(
            adapter_name,
            out_expansion,
            in_expansion,
            init,
            open_w12=open_w12,
            frozen_slice=frozen_slice,
            route_gated=route_gated,
            init_weights=init_weights,
            inference_mode=inference_mode,
        )

    def update_layer(
        self,
        adapter_name: str,
        out_expansion: int,
        in_expansion: int,
        init: str,
        open_w12: bool = True,
        frozen_slice: str = "off",
        route_gated: bool = False,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add the blocks of one adapter (``open_w12=False``: ``W12`` stays a frozen zero block, i.e. absent)."""
        if out_expansion < 0 or in_expansion < 0 or out_expansion + in_expansion == 0:
            raise ValueError(f"A SCALE layer needs a positive expansion, got out={out_expansion}, in={in_expansion}.")
        base = self.get_base_layer()
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base)}  # fp32 next to a quantized weight
        if out_expansion:
            rows = torch.empty(self.out_parts * out_expansion, self.in_features, **factory)
            self.scale_w21[adapter_name] = nn.Parameter(rows)
            if base.bias is not None:
                self.scale_b21[adapter_name] = nn.Parameter(torch.empty(self.out_parts * out_expansion, **factory))
        if in_expansion and open_w12:
            self.scale_w12[adapter_name] = nn.Parameter(torch.empty(self.out_features, in_expansion, **factory))
        if in_expansion and out_expansion:
            self.scale_w22[adapter_name] = nn.Parameter(
                torch.empty(self.out_parts * out_expansion, in_expansion, **factory)
            )
        self.out_expansion[adapter_name] = out_expansion
        self.in_expansion[adapter_name] = in_expansion
        self.frozen_slice[adapter_name] = frozen_slice
        self.route_gated[adapter_name] = bool(route_gated and in_expansion and open_w12)
        self.reset_scale_parameters(adapter_name, init, init_weights)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_scale_parameters(self, adapter_name: str, init: str, init_weights: bool = True) -> None:
        """``W21`` from the base rows (each packed part from its own rows); ``W22`` normal at the base weight's
        scale; ``b21`` and ``W12`` at zero, or with ``init_weights=False`` drawn as a fresh ``nn.Linear`` over the
        widened input draws its weight and bias (``ScaleConfig.init_weights``: the output changes from the start)."""
        w12, b21 = self.scale_w12.get(adapter_name), self.scale_b21.get(adapter_name)
        if w12 is not None:
            w12.zero_()  # zero: the original output is untouched at initialisation
        if b21 is not None:
            b21.zero_()
        if not init_weights:  # as a fresh nn.Linear over the widened input [x; x_up] would draw them
            fan_in = self.in_features + self.in_expansion[adapter_name]
            init_like_linear(w12, fan_in)
            init_like_linear(b21, fan_in)
        if adapter_name not in self.scale_w21:
            return
        w21 = self.scale_w21[adapter_name]
        if not self._materialised(w21):
            return
        base_rows = weight_rows(self.get_base_layer())  # dequantised, for a quantized base
        make_rows = INIT_ROWS[init]
        k = self.out_expansion[adapter_name]
        for part, rows in enumerate(base_rows.chunk(self.out_parts, dim=0)):
            w21[part * k : (part + 1) * k].copy_(make_rows(rows, k))
        if adapter_name in self.scale_w22:
            w22 = self.scale_w22[adapter_name]
            w22.copy_(torch.randn_like(w22, dtype=torch.float32) * base_rows.float().std())

    # ----------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = self._active_scale_adapters()
        if active and self.route_gates.idle:  # adapters the router sends no token to in this pass compute nothing
            active = self.route_gates.busy(active, x)
        if not active:
            return self.base_layer(x, *args, **kwargs)

        copy = self.carries_frozen_slice()
        widths = self._check_stream(x, self.in_features, copy, {name: self.in_expansion[name] for name in active})
        # (batch, seq, 1) gate (0/1, or [0, 1] with a soft gate) per adapter whose W12 the learned router gates
        gates = {name: self.route_gates.get(name, x) for name in active if self.route_gated.get(name)}
        if len(active) == 1 and not copy and not args and not kwargs and self._takes_one_node():
            return self._widened_linear(active[0], x, gates.get(active[0]))

        # 1. the input: [x_pres; x; x_up_a; ...]. [x; x_up] of a single adapter stays one tensor: W21 and W22 then
        # act as one product [W21 W22] [x; x_up] (see _new_rows).
        x_and_up = x[..., self.in_features :] if copy else x
        x_pres, x, x_ups = self._split_stream(x, widths, copy)
        # the frozen slice sees the frozen base layer only: exactly the base model's computation
        preserved = self.base_layer(x_pres, *args, **kwargs) if x_pres is not None else None
        # 2. the blocks
        result = self.base_layer(x, *args, **kwargs)  # (..., out): W x + b
        new_rows = []
        for name, x_up in zip(active, x_ups):
            if name in self.scale_w12:  # + W12 x_up (x g, the router's gate, when routed)
                w12 = self.scale_w12[name]
                from_new = F.linear(self._cast_input_dtype(x_up, w12.dtype), w12).to(result.dtype)
                result = result + (from_new * gates[name] if name in gates else from_new)
            if name in self.scale_w21:  # y_up = W21 x + b21 (+ W22 x_up)
                new_rows.append(self._new_rows(name, x, x_up, x_and_up if len(active) == 1 else None).to(result.dtype))
        # 3. the output: [W x_pres + b; y; y_up_a; ...], packed parts each followed by their new rows
        result = self._interleave_new_rows(result, new_rows)
        if preserved is not None:
            result = torch.cat([preserved, result], dim=-1)  # (..., out + out + new): [W x_pres; y; y_up]
        return result

    def _interleave_new_rows(self, result: torch.Tensor, new_rows: list[torch.Tensor]) -> torch.Tensor:
        """``y`` and the adapters' ``y_up`` as one output: ``[y; y_up_a; ...]``, or with packed projections
        ``[part_0; part_0's new rows per adapter; part_1; ...]`` so the model's own ``chunk`` still splits it."""
        if not new_rows:
            return result
        if self.out_parts == 1:
            return torch.cat([result, *new_rows], dim=-1)  # (..., out + sum of out_expansions)
        parts = [result.chunk(self.out_parts, dim=-1)] + [rows.chunk(self.out_parts, dim=-1) for rows in new_rows]
        return torch.cat([piece for part in zip(*parts) for piece in part], dim=-1)

    def _takes_one_node(self) -> bool:
        """Whether ``WidenedLinear`` (one autograd node, hand-written backward) can compute this layer: a plain
        ``nn.Linear`` base (its ``forward`` not overridden, e.g. by a quantized subclass) that is frozen, one output
        projection (not packed parts) and PEFT's input casting left on. Otherwise the general path below runs."""
        base = self.base_layer
        return (
            type(base).forward is nn.Linear.forward
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and self.out_parts == 1
            and getattr(self, "cast_input_dtype_enabled", True)
        )

    def _widened_linear(self, name: str, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        base = self.base_layer
        return widened_linear(
            x, base.weight, base.bias, self.scale_w12.get(name), self.scale_w21.get(name), self.scale_b21.get(name),
            self.scale_w22.get(name), gate=gate,
        )

    def _new_rows(self, name: str, x: torch.Tensor, x_up: torch.Tensor, x_and_up: Optional[torch.Tensor]):
        """``y_up = W21 x + b21 + W22 x_up``.

        With ``W22`` this is one product with ``[W21 W22]`` over ``[x; x_up]``: one matrix product instead of two
        and an addition, forward and backward, for the price of concatenating the (small, trainable) new blocks.
        The frozen ``W`` is never copied. With a single active adapter the input is ``[x; x_up]`` already
        (``x_and_up``); with several, ``[x; x_up]`` of this adapter is concatenated (a copy of the input), so that
        each adapter's new rows are bit-identical to what it computes when active alone: several learned-route
        adapters routed together then give a token exactly what its adapter alone gives (``peft_scale.routing``)."""
        w21 = self.scale_w21[name]
        b21 = self.scale_b21[name] if name in self.scale_b21 else None
        if name not in self.scale_w22:
            return F.linear(self._cast_input_dtype(x, w21.dtype), w21, b21)
        if x_and_up is None:
            x_and_up = torch.cat([x, x_up], dim=-1)
        w22 = self.scale_w22[name]
        return F.linear(self._cast_input_dtype(x_and_up, w21.dtype), torch.cat([w21, w22], dim=1), b21)

    # ------------------------------------------------------------------------------------------- merging

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        """A wider copy of the base layer holding the adapters' blocks (``widened_copy``)."""
        wide = self._pretrained_layer()
        for name in adapter_names:
            wide = widened_copy(
                wide,
                in_expansion=self.in_expansion[name],
                w12=self.scale_w12.get(name),
                w21=self.scale_w21.get(name),
                b21=self.scale_b21.get(name),
                w22=self.scale_w22.get(name),
                out_parts=self.out_parts,
            )
        return wide

    def __repr__(self) -> str:
        return "scale." + super().__repr__()


# The names before 0.2 (PEFT's convention, ``LoraLayer`` / ``lora.Linear``, came later): kept, because user code, the
# tests and pickled modules refer to them. ``ScaleLayer`` is this concrete linear layer, not the mixin.
ScaleLayer = Linear


# ------------------------------------------------------------------------------------------- the merged form


def _new_like(base: nn.Module, rows: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A module of the base's own class (``FalconLinear`` stays ``FalconLinear``; a bitsandbytes layer is
    requantised with its settings) holding ``rows``."""
    if bnb_kind(base) is not None:
        return quantized_like(base, rows, bias)
    out_features, in_features = rows.shape
    requires_grad = base.weight.requires_grad
    if isinstance(base, Conv1D):
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(rows.T.contiguous(), requires_grad=requires_grad)
    else:
        new = type(base)(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(rows.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return new


@torch.no_grad()
def widened_copy(
    base: nn.Module,
    in_expansion: int,
    w12: Optional[torch.Tensor],
    w21: Optional[torch.Tensor],
    b21: Optional[torch.Tensor],
    w22: Optional[torch.Tensor],
    out_parts: int = 1,
) -> nn.Module:
    """Return a copy of ``base`` widened to the single matrix ``[[W, W12], [W21, W22]]`` (absent blocks are zero).

    The base may already be a widened copy (an earlier adapter merged into it): its extra input columns and
    output rows belong to that adapter, so this adapter's ``W21`` reads none of those columns and its ``W12``
    writes none of those rows (zeros there), exactly as in the unmerged forward, where adapters do not see
    each other's features. With ``out_parts``
    packed projections, each part gets its own new rows right after it, as in ``Linear.forward``.

    A bitsandbytes base is dequantised, widened and requantised (``peft_scale.quantized.quantized_like``).
    """
    weight = weight_rows(base)  # (out, in), dequantised for a quantized base
    dtype, device = weight.dtype, weight.device
    out_features, in_features = weight.shape
    part_out = out_features // out_parts
    new_in = in_features + in_expansion
    part_new = (w21.shape[0] // out_parts) if w21 is not None else 0
    rows = torch.zeros(out_parts * (part_out + part_new), new_in, dtype=dtype, device=device)
    bias = None
    if base.bias is not None:
        bias = torch.zeros(rows.shape[0], dtype=dtype, device=device)
    for p in range(out_parts):
        start = p * (part_out + part_new)
        old = slice(p * part_out, (p + 1) * part_out)
        rows[start : start + part_out, :in_features] = weight[old]
        if w12 is not None:
            # W12 feeds the original outputs only; rows an earlier merged adapter added get none of it.
            w12_part = w12.shape[0] // out_parts
            rows[start : start + w12_part, in_features:] = w12[p * w12_part : (p + 1) * w12_part].to(dtype)
        if bias is not None:
            bias[start : start + part_out] = base.bias[old]
        if w21 is not None:
            new = slice(p * part_new, (p + 1) * part_new)
            rows[start + part_out : start + part_out + part_new, : w21.shape[1]] = w21[new].to(dtype)
            if w22 is not None:
                rows[start + part_out : start + part_out + part_new, in_features:] = w22[new].to(dtype)
            if b21 is not None:
                bias[start + part_out : start + part_out + part_new] = b21[new].to(dtype)
    return _new_like(base, rows, bias)
