"""Mixture-of-experts layers whose experts are fused 3-D parameters: finding them, and the SCALE layer that widens
every expert's intermediate size.

transformers keeps the experts of most MoE families (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) as one
module holding two 3-D parameters, called as ``experts(hidden_states, top_k_index, top_k_weights)``::

    input  (gate_up_proj or up_proj): (E, p*I, D)    transposed: (E, D, p*I)    p = 2 packed parts [gate; up], or 1
    output (down_proj):               (E, D, I)      transposed: (E, I, D)

Expert ``e`` computes ``y_e(x) = down_e h(in_e x + b_in_e) + b_down_e``, ``h`` elementwise per neuron (``act(gate) *
up``, gpt-oss's clamped ``(up + 1) glu``), and the layer returns ``sum_k w_k y_{e_k}(x)`` over the router's top-k
choice. SCALE gives every expert ``k`` new neurons (``ffn_expansion``)::

    in_e  -> [in_e; W21_e]   (k new rows per packed part, b21_e)         down_e -> [down_e  W12_e]   (k new columns)

Because ``h`` acts neuron by neuron, the widened expert is the base expert plus an expert made of the new neurons
alone, ``y'_e(x) = y_e(x) + W12_e h(W21_e x + b21_e)``, so the layer computes

    y = experts(x, top_k) + g * experts[W21, b21, W12, 0](x, top_k)

with the family's own expert code both times (its gating, clamps and experts implementation: eager, ``grouped_mm``,
``batched_mm``), the second time on the new parameters in place of the base ones (``torch.func.functional_call``;
the down bias counted once). The MoE router is not touched, so the expert choice is the base model's, and with
``W12 = 0`` the output is the base output plus exact zeros. ``g`` is the learned router's per-token gate
(SCALE-Route), 1 otherwise.

What shape cannot tell (which half of a packed projection is the gate, whether gate and up are interleaved, the
bias names), the experts class declares itself through transformers' ``@use_experts_implementation`` (its
``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``, ``has_post_expert_norm`` attributes):
``experts_layout`` reads those and checks them against the shapes. A few classes that do not declare them have a
row in ``UNDECLARED_LAYOUTS`` instead, read from their family's code (Llama 4's experts, Inkling's shared experts,
JetMoE's whole MoE layer), each checked end to end by ``tests/test_architecture_sweep.py``. Any other experts module
that declares nothing, or one that normalises each expert's output (not a sum over neurons), is refused with its
class named.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from .layer import INIT_ROWS, ScaleTunerLayer, init_like_linear

# Config fields that hold the experts' intermediate size, most specific first (the first whose value is the experts'
# I is updated by a merge): DeepSeek / Qwen-MoE keep the dense layers' size in ``intermediate_size`` next to it.
EXPERTS_SIZE_FIELDS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused-experts module stores its experts.

    Args:
        inputs: the 3-D input parameter (``gate_up_proj`` / ``up_proj``), or one per part where the parts are kept
            apart (Inkling's shared experts: ``gate_proj``, ``up_proj``). Names are relative to the module, dotted
            where the parameter is a submodule's (JetMoE: ``input_linear.weight``).
        output_name: the 3-D output parameter (``down_proj``).
        input_bias, output_bias: the ``(E, p*I)`` input bias, or ``None``; the bias added to the output (``(E, D)``,
            or JetMoE's ``(D,)`` after the sum over experts), or ``None``.
        num_experts, hidden, intermediate: ``E``, ``D``, ``I``.
        parts: projections packed in the input (2: gate and up; 1: up only).
        interleaved: the packed parts alternate neuron by neuron (``[g0, u0, g1, u1, ...]``, gpt-oss) instead of
            following each other (``[gate; up]``).
        transposed: ``(E, D, p*I)`` / ``(E, I, D)`` (the forward computes ``x @ W``) instead of ``(E, p*I, D)`` /
            ``(E, D, I)`` (``W x``).
        replayed: child modules the module calls before its experts (JetMoE's router) whose output the new
            neurons' pass takes from the base pass: they run, and are recorded (router logits), once.
    """

    inputs: tuple[str, ...]
    output_name: str
    input_bias: Optional[str]
    output_bias: Optional[str]
    num_experts: int
    hidden: int
    intermediate: int
    parts: int
    interleaved: bool
    transposed: bool
    replayed: tuple[str, ...] = ()

    @property
    def input_axis(self) -> int:
        """The neuron axis of the input parameter."""
        return 2 if self.transposed else 1

    @property
    def output_axis(self) -> int:
        """The neuron axis of the output parameter."""
        return 1 if self.transposed else 2


class UnsupportedExperts(ValueError):
    """A module holds 3-D expert parameters SCALE cannot widen (the message says why)."""


@dataclass(frozen=True)
class DeclaredLayout:
    """What an experts class declares with ``@use_experts_implementation`` (or would: ``UNDECLARED_LAYOUTS``), and
    where its parameters are when they are not its own ``gate_up_proj`` / ``up_proj`` and ``down_proj``: ``inputs``,
    ``output_name``, ``output_bias`` (a bias after the sum over experts) and ``replayed`` as in ``ExpertsLayout``."""

    is_transposed: bool
    has_gate: bool = True
    is_concatenated: bool = True
    has_bias: bool = False  # per-expert biases ``<input>_bias`` (E, p*I) and ``down_proj_bias`` (E, D)
    inputs: Optional[tuple[str, ...]] = None
    output_name: str = "down_proj"
    output_bias: Optional[str] = None
    replayed: tuple[str, ...] = ()


# Experts classes of transformers 5.25 that declare no layout, read from their forward (``None``: not an experts
# module). Each row is checked end to end (init exact, training, save/load, merged checkpoint) by the registry sweep.
UNDECLARED_LAYOUTS: dict[str, Optional[DeclaredLayout]] = {
    # bmm(x, gate_up_proj) (E, D, 2I), .chunk(2): gate then up; bmm(up * act(gate), down_proj) (E, I, D). The input
    # arrives already routed (each expert's copy scaled by its router score) and the outputs are summed by the caller.
    "Llama4TextExperts": DeclaredLayout(is_transposed=True),
    # x @ gate_proj^T and x @ up_proj^T (each (E, I, D)), act(gate) * up * gamma, @ down_proj^T (E, D, I), summed over
    # the shared experts: forward(hidden_states, gammas).
    "InklingSharedExperts": DeclaredLayout(is_transposed=False, inputs=("gate_proj", "up_proj")),
    # JetMoeMoE is the whole MoE layer: router, then per expert F.linear(x, input_linear.weight[e]) (E, 2I, D),
    # .chunk(2): act(gate) * up, F.linear(., output_linear.weight[e]) (E, D, I), times the gate, summed, + bias (D,).
    "JetMoeMoE": DeclaredLayout(
        is_transposed=False,
        inputs=("input_linear.weight",),
        output_name="output_linear.weight",
        output_bias="bias",
        replayed=("router",),
    ),
    # One projection of JetMoeMoE (above), or of the attention's JetMoeMoA (query and output projections of
    # attention experts): not a whole FFN.
    "JetMoeParallelExperts": None,
}


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of ``module`` if it is a fused-experts module, ``None`` if it is none (no 3-D parameter, or 3-D
    parameters in a module that neither declares an experts layout, nor has a row in ``UNDECLARED_LAYOUTS``, nor is
    called ``*Expert*``).

    Raises:
        UnsupportedExperts: 3-D parameters whose layout is undeclared, inconsistent with the shapes, or whose experts
            normalise their output.
    """
    if isinstance(module, nn.modules.conv._ConvNd):  # a convolution's (out, in, kernel) weight is not an expert
        return None
    cls = type(module).__name__
    if cls in UNDECLARED_LAYOUTS:
        row = UNDECLARED_LAYOUTS[cls]
        return None if row is None else _read_layout(module, row)
    fused = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if not fused:
        return None
    if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        if "expert" not in cls.lower():
            return None  # 3-D parameters of another kind (not a module of experts)
        raise UnsupportedExperts(
            f"{cls} holds 3-D parameters {fused} but does not declare their layout (transformers' "
            "@use_experts_implementation): which part of a packed projection is the gate, and whether gate and up "
            "are interleaved, cannot be read from the shapes. SCALE does not widen these experts."
        )
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExperts(
            f"{cls} normalises each expert's output, so the new neurons are not a sum next to the old ones and "
            "SCALE cannot add them as a separate expert computation. SCALE does not widen these experts."
        )
    declared = DeclaredLayout(
        is_transposed=bool(module.is_transposed),
        has_gate=bool(module.has_gate),
        is_concatenated=bool(getattr(module, "is_concatenated", True)),
        has_bias=bool(getattr(module, "has_bias", False)),
    )
    return _read_layout(module, declared)


def _read_layout(module: nn.Module, declared: DeclaredLayout) -> ExpertsLayout:
    """``ExpertsLayout`` of ``module`` from what its class declares, checked against the shapes."""
    cls = type(module).__name__
    parts = 2 if declared.has_gate else 1
    inputs = declared.inputs or ("gate_up_proj" if declared.has_gate else "up_proj",)
    names = [*inputs, declared.output_name]
    fused = {name: tuple(p.shape) for name, p in module.named_parameters() if p.dim() == 3}
    if set(fused) != set(names):
        raise UnsupportedExperts(
            f"{cls} declares a {'gated' if parts == 2 else 'plain'} experts layout ({names}) but holds the 3-D "
            f"parameters {fused}. SCALE does not widen these experts."
        )
    if declared.is_transposed:
        (e_in, hidden, packed), (e_out, intermediate, hidden_out) = fused[inputs[0]], fused[declared.output_name]
    else:
        (e_in, packed, hidden), (e_out, hidden_out, intermediate) = fused[inputs[0]], fused[declared.output_name]
    apart = len(inputs) > 1  # one parameter per part, each (E, I, D): together they are the packed input
    same_shapes = len({fused[name] for name in inputs}) == 1 and len(inputs) in (1, parts)
    if not same_shapes or e_in != e_out or hidden != hidden_out or packed * len(inputs) != parts * intermediate:
        raise UnsupportedExperts(
            f"{cls}'s shapes {fused} do not fit its declared layout (transposed={declared.is_transposed}, {parts} "
            "packed parts): expected (E, p*I, D) and (E, D, I), or transposed (E, D, p*I) and (E, I, D). SCALE does "
            "not widen these experts."
        )
    return ExpertsLayout(
        inputs=inputs,
        output_name=declared.output_name,
        input_bias=f"{inputs[0]}_bias" if declared.has_bias else None,
        output_bias="down_proj_bias" if declared.has_bias else declared.output_bias,
        num_experts=e_in,
        hidden=hidden,
        intermediate=intermediate,
        parts=parts,
        interleaved=parts > 1 and not apart and not declared.is_concatenated,
        transposed=declared.is_transposed,
        replayed=declared.replayed,
    )


def find_fused_experts(model: nn.Module) -> tuple[dict[str, ExpertsLayout], dict[str, str]]:
    """The fused-experts modules of ``model``: ``({name: layout}, {name: why refused})``. Modules already wrapped by
    SCALE are read through to their base layer."""
    found, refused = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            found[name] = module.layout
            continue
        if name.endswith(".base_layer") and name[: -len(".base_layer")] in found:
            continue
        try:
            layout = experts_layout(module)
        except UnsupportedExperts as error:
            refused[name] = str(error)
            continue
        if layout is not None:
            found[name] = layout
    return found, refused


def fused_expert_targets(model: nn.Module) -> list[str]:
    """The ``target_modules`` entries that name every fused-experts module of ``model`` and nothing else: the name
    after the layer index (``mlp.experts``) where that suffix names only experts, else the full names.

    Raises:
        ValueError: the model holds experts SCALE cannot widen (``experts_layout``), naming the family's class.
    """
    found, refused = find_fused_experts(model)
    if refused:
        name, why = next(iter(refused.items()))
        raise ValueError(
            f"SCALE cannot widen the experts of this {type(model).__name__}: {name!r}: {why} Name the dense MLPs to "
            "widen yourself with target_modules / ffn_output_modules, or use another family."
        )
    suffixes = {_after_layer_index(name) for name in found}
    names = [name for name, _ in model.named_modules()]
    if all(any(n == s or n.endswith("." + s) for s in suffixes) == (n in found) for n in names):
        return sorted(suffixes)
    return sorted(found)


def _after_layer_index(name: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``mlp.experts`` (the whole name if it has no index)."""
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1 :]) if digits else name


def experts_size_field(model_config, intermediate: int) -> Optional[str]:
    """The config field holding the experts' intermediate size ``intermediate`` (``EXPERTS_SIZE_FIELDS`` order)."""
    return next((f for f in EXPERTS_SIZE_FIELDS if getattr(model_config, f, None) == intermediate), None)


# --------------------------------------------------------------------------------------------- tensors


def _append_neurons(base: torch.Tensor, new: torch.Tensor, axis: int, parts: int, interleaved: bool) -> torch.Tensor:
    """``base`` with ``new`` neurons along ``axis``: after each packed part (``[g; g_new; u; u_new]``), or at the end
    for one part or interleaved parts (``new`` is then interleaved itself)."""
    if parts == 1 or interleaved:
        return torch.cat([base, new.to(base.dtype)], dim=axis)
    pieces = zip(base.chunk(parts, dim=axis), new.to(base.dtype).chunk(parts, dim=axis))
    return torch.cat([piece for pair in pieces for piece in pair], dim=axis)


def _split_parts(rows: torch.Tensor, parts: int, interleaved: bool) -> list[torch.Tensor]:
    """The packed parts of ``rows`` (neurons first), each ``(I, ...)``."""
    if interleaved:
        return [rows[p::parts] for p in range(parts)]
    return list(rows.chunk(parts, dim=0))


def _pack_parts(pieces: list[torch.Tensor], interleaved: bool) -> torch.Tensor:
    """The inverse of ``_split_parts``: ``[p0; p1]``, or ``[p0_0, p1_0, p0_1, ...]`` interleaved."""
    if interleaved:
        return torch.stack(pieces, dim=1).flatten(0, 1)
    return torch.cat(pieces, dim=0)


def _copy_holding(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` (the family's class and attributes, with its own containers; other tensors shared) that
    holds ``tensors`` as frozen parameters. A dotted name (JetMoE's ``input_linear.weight``) copies the child on the
    way, so the pre-trained module is left as it was (unmerging swaps it back)."""
    wide = copy.copy(module)
    for container in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
        setattr(wide, container, type(getattr(module, container))(getattr(module, container)))
    by_child: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        child, _, rest = key.partition(".")
        if rest:
            by_child[child][rest] = tensor
        else:
            setattr(wide, key, nn.Parameter(tensor.contiguous(), requires_grad=False))
    for child, inner in by_child.items():
        setattr(wide, child, _copy_holding(module.get_submodule(child), inner))
    return wide


class _Replay(nn.Module):
    """Stands in for a child module in the new neurons' pass: returns what the child returned in the base pass."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextmanager
def _recording(module: nn.Module, children: tuple[str, ...], outputs: dict):
    """Record into ``outputs`` what each of ``module``'s ``children`` returns while the context is open."""

    def record(child):
        return lambda m, args, out: outputs.update({child: out})

    handles = [module.get_submodule(child).register_forward_hook(record(child)) for child in children]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replaying(module: nn.Module, outputs: dict):
    """``module``'s children named in ``outputs`` replaced by ``_Replay`` of their recorded outputs (the new neurons'
    pass takes JetMoE's routing from the base pass: its router runs, and its logits are recorded, once)."""
    children = {child: module._modules[child] for child in outputs}
    try:
        for child, output in outputs.items():
            module._modules[child] = _Replay(output)
        yield
    finally:
        module._modules.update(children)


# ------------------------------------------------------------------------------------------------ layer


class Experts(nn.Module, ScaleTunerLayer):
    """A frozen fused-experts module whose every expert gets ``expansion`` new neurons (see the module docstring).

    Per adapter, in the family's own layout (``ExpertsLayout``), for all experts at once:

    - ``scale_w21``: the new input rows, ``(E, p*k, D)`` (transposed ``(E, D, p*k)``), each packed part's rows drawn
      from that expert's own rows of the part (``init``, as ``layer.Linear``'s ``W21``), packed as the family packs.
    - ``scale_b21``: their bias ``(E, p*k)`` when the experts have biases, zero at first.
    - ``scale_w12``: the new output columns, ``(E, D, k)`` (transposed ``(E, k, D)``), zero at first: the only path
      from the new neurons to the output. Absent where the plan keeps ``W12`` closed (below ``preserve_layers``).

    Several active adapters each add their own neurons: ``y = experts(x) + sum_a g_a experts_a(x)``. A learned-route
    adapter's gate ``g_a`` (``route_gated``) comes per token from the model's ``RouteGates``.

    Merging swaps in a copy of the base module (the family's own class) with the wider tensors; unmerging swaps the
    pre-trained module back (exact).

    Args:
        base_layer: the experts module (``experts_layout`` must read it).
        adapter_name: name of the first adapter.
        expansion: new neurons per expert (``k``).
        options: of ``update_layer``: ``init`` (``"svd"`` or ``"normal"``, the initialisation of ``W21``),
            ``open_w12`` (whether ``W12`` exists, see ``peft_scale.plan``), ``route_gated`` (whether the learned
            router's gate multiplies this adapter's new neurons' output), ``inference_mode``.

    Raises:
        UnsupportedExperts: ``base_layer`` is not a fused-experts module SCALE can widen.
    """

    adapter_layer_names = ("scale_w21", "scale_b21", "scale_w12", "scale_router")
    other_param_names = ("expansion", "route_gated")
    _widths_attr = "expansion"
    _kind = "experts module"

    def __init__(self, base_layer: nn.Module, adapter_name: str, expansion: int, **options) -> None:
        super().__init__()
        layout = experts_layout(base_layer)
        if layout is None:
            raise UnsupportedExperts(f"{type(base_layer).__name__} holds no 3-D expert parameters.")
        self._init_tuner_state(base_layer, adapter_name)
        self.layout = layout
        self.scale_w21 = nn.ParameterDict()
        self.scale_b21 = nn.ParameterDict()
        self.scale_w12 = nn.ParameterDict()
        self.scale_router = nn.ModuleDict()  # a learned router, when this is the first module it gates
        self.expansion: dict[str, int] = {}
        self.route_gated: dict[str, bool] = {}
        self._unmerged_base_layer: list[nn.Module] = []  # the pre-trained module while merged (ScaleTunerLayer.merge)
        self.update_layer(adapter_name, expansion, **options)  # init, open_w12, route_gated, inference_mode

    def update_layer(
        self,
        adapter_name: str,
        expansion: int,
        init: str = "svd",
        open_w12: bool = True,
        route_gated: bool = False,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        if expansion <= 0:
            raise ValueError(f"A SCALE experts layer needs a positive expansion, got {expansion}.")
        lay, base = self.layout, self.get_base_layer()
        reference = base.get_parameter(lay.inputs[0])
        factory = {"device": reference.device, "dtype": reference.dtype}
        rows = (lay.num_experts, lay.parts * expansion)
        w21_shape = (lay.num_experts, lay.hidden, lay.parts * expansion) if lay.transposed else (*rows, lay.hidden)
        self.scale_w21[adapter_name] = nn.Parameter(torch.empty(w21_shape, **factory))
        if lay.input_bias is not None:
            self.scale_b21[adapter_name] = nn.Parameter(torch.empty(rows, **factory))
        if open_w12:
            shape = (lay.num_experts, expansion, lay.hidden) if lay.transposed else (lay.num_experts, lay.hidden, expansion)
            self.scale_w12[adapter_name] = nn.Parameter(torch.empty(shape, **factory))
        self.expansion[adapter_name] = expansion
        self.route_gated[adapter_name] = bool(route_gated and open_w12)
        self.reset_scale_parameters(adapter_name, init, init_weights)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_scale_parameters(self, adapter_name: str, init: str, init_weights: bool = True) -> None:
        """``W21`` from each expert's rows, part by part (``INIT_ROWS[init]``); ``b21`` and ``W12`` at zero, or with
        ``init_weights=False`` drawn as a fresh ``nn.Linear`` over the widened intermediate size would draw them."""
        fan_in = {"w12": self.layout.intermediate + self.expansion[adapter_name], "b21": self.layout.hidden}
        for name, params in (("w12", self.scale_w12), ("b21", self.scale_b21)):
            if adapter_name in params:
                params[adapter_name].zero_()
                if not init_weights:
                    init_like_linear(params[adapter_name], fan_in[name])
        w21 = self.scale_w21[adapter_name]
        if not self._materialised(w21):
            return
        lay, k = self.layout, self.expansion[adapter_name]
        weight = self._packed_input(self.get_base_layer())
        for e in range(lay.num_experts):
            rows = weight[e].T if lay.transposed else weight[e]  # (p*I, D)
            new = [INIT_ROWS[init](part, k) for part in _split_parts(rows, lay.parts, lay.interleaved)]
            packed = _pack_parts(new, lay.interleaved)  # (p*k, D)
            w21[e].copy_(packed.T if lay.transposed else packed)

    # ----------------------------------------------------------------------------------------------- forward

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.merged:
            return self.base_layer(hidden_states, *args, **kwargs)
        replayed: dict[str, object] = {}  # the base pass's outputs of the layout's replayed children
        with _recording(self.base_layer, self.layout.replayed, replayed):
            result = self.base_layer(hidden_states, *args, **kwargs)
        for name in self._active_scale_adapters():
            if name not in self.scale_w12:  # W12 closed: the new neurons cannot reach the output
                continue
            gate = self._token_gate(name, hidden_states) if self.route_gated.get(name) else None
            if gate is not None and name in self.route_gates.idle:  # no token goes to this adapter in this pass
                continue
            with _replaying(self.base_layer, replayed):
                new = self._new_neurons(name, hidden_states, *args, **kwargs).to(result.dtype)
            result = result + (new * gate if gate is not None else new)
        return result

    def _new_neurons(self, name: str, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The experts made of this adapter's new neurons alone, computed by the family's own expert code on the same
        routing: ``sum_k w_k W12_e h(W21_e x + b21_e)``."""
        lay, base = self.layout, self.get_base_layer()
        w21 = self.scale_w21[name]
        params = {**self._input_parameters(w21), lay.output_name: self.scale_w12[name]}
        if lay.input_bias is not None:
            params[lay.input_bias] = self.scale_b21[name]
        if lay.output_bias is not None:  # counted once, in the base pass
            params[lay.output_bias] = torch.zeros_like(base.get_parameter(lay.output_bias), dtype=w21.dtype)
        return functional_call(base, params, (hidden_states.to(w21.dtype), *args), kwargs, strict=False)

    def _input_parameters(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rows`` packed as ``scale_w21`` is, as the layout's input parameters: one, or one per part kept apart."""
        lay = self.layout
        if len(lay.inputs) == 1:
            return {lay.inputs[0]: rows}
        return dict(zip(lay.inputs, rows.chunk(lay.parts, dim=lay.input_axis)))

    def _packed_input(self, base: nn.Module) -> torch.Tensor:
        """The experts' input weight of ``base`` as one packed ``(E, p*I, D)`` (transposed ``(E, D, p*I)``) tensor."""
        return torch.cat([base.get_parameter(name) for name in self.layout.inputs], dim=self.layout.input_axis)

    def _token_gate(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The learned router's ``(batch, seq, 1)`` gate of ``name``, reshaped to the experts' tokens: the MoE block
        flattens ``(batch, seq)``, in order, and may repeat them once per expert (Llama 4 gives every expert
        every token, ``(experts * batch * seq, in)``), which repeats the gate alike."""
        gate = self.route_gates.gates.get(name)
        tokens, experts_tokens = (gate[..., 0].numel() if gate is not None else 0), like[..., 0].numel()
        if gate is not None and tokens and experts_tokens != tokens and experts_tokens % tokens == 0:
            return gate.reshape(-1, 1).repeat(experts_tokens // tokens, 1).reshape(*like.shape[:-1], 1)
        if gate is None or tokens != experts_tokens:
            raise RuntimeError(
                f"SCALE: no routing decision of adapter {name!r} for these {like[..., 0].numel()} expert tokens: the "
                "router runs at the entry of decoder layer `preserve_layers`, which this forward pass did not go "
                "through. Call the whole model, not a single layer."
            )
        return gate.reshape(*like.shape[:-1], 1)

    # ------------------------------------------------------------------------------------------- merging

    def _merged_module(self, adapter_names: list[str]) -> nn.Module:
        """A copy of the pre-trained experts module (its own class) holding every expert's new neurons."""
        routed = [name for name in adapter_names if self.route_gated.get(name)]
        if routed:
            raise ValueError(
                f"Cannot merge SCALE-Route adapter(s) {routed}: the learned router's gate depends on the token, and "
                "merged experts are one set of tensors for every token."
            )
        wide = self._pretrained_layer()
        for name in adapter_names:
            wide = self._widened(wide, name)
        return wide

    @torch.no_grad()
    def _widened(self, base: nn.Module, name: str) -> nn.Module:
        """A copy of ``base`` (same class, same non-parameter state) with ``name``'s neurons appended to every
        expert: ``W21`` (``b21``) after each packed part of the input, ``W12`` (zeros if closed) after the output's
        columns."""
        lay, k = self.layout, self.expansion[name]
        w_out = base.get_parameter(lay.output_name)
        w12 = self.scale_w12[name] if name in self.scale_w12 else w_out.new_zeros(self.scale_w12_shape(k))
        parts = lay.parts if len(lay.inputs) == 1 else 1  # parts kept apart: each gets its part's rows at its end
        tensors = {
            key: _append_neurons(base.get_parameter(key), rows, lay.input_axis, parts, lay.interleaved)
            for key, rows in self._input_parameters(self.scale_w21[name]).items()
        }
        tensors[lay.output_name] = torch.cat([w_out, w12.to(w_out.dtype)], dim=lay.output_axis)
        if lay.input_bias is not None:
            b_in = base.get_parameter(lay.input_bias)
            tensors[lay.input_bias] = _append_neurons(b_in, self.scale_b21[name], 1, lay.parts, lay.interleaved)
        wide = _copy_holding(base, tensors)
        intermediate = tensors[lay.output_name].shape[lay.output_axis]
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):  # the families' own record of I
            if isinstance(getattr(wide, attr, None), int):
                setattr(wide, attr, intermediate)
        return wide

    def scale_w12_shape(self, k: int) -> tuple[int, int, int]:
        lay = self.layout
        return (lay.num_experts, k, lay.hidden) if lay.transposed else (lay.num_experts, lay.hidden, k)

    def merged_intermediate(self, adapter_names: Optional[list[str]] = None) -> int:
        """The experts' intermediate size once ``adapter_names`` (default: the active ones) and those already merged
        are merged."""
        names = set(adapter_names if adapter_names is not None else self.active_adapters) | set(self.merged_adapters)
        return self.layout.intermediate + sum(self.expansion.get(name, 0) for name in names)

    def __repr__(self) -> str:
        return "scale." + super().__repr__()


def merged_experts_size(model: nn.Module, adapter_names: Optional[list[str]]) -> Optional[tuple[str, int]]:
    """``(config field, size)`` the merged model's config records for its experts, ``None`` without SCALE experts.

    Raises:
        ValueError: the merged experts would differ in size (some layers widened, others not), or no config field
            holds their intermediate size.
    """
    found, _ = find_fused_experts(model)
    widened = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    if not widened:
        return None
    sizes = {
        name: widened[name].merged_intermediate(adapter_names) if name in widened else layout.intermediate
        for name, layout in found.items()
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"Cannot merge into a standard checkpoint: the merged experts would have different intermediate sizes "
            f"({sorted(set(sizes.values()))}), and a config holds one. Widen the experts of every layer (drop "
            "layers_to_transform / exclude_modules), or keep the model unmerged and save the adapter with "
            "save_pretrained."
        )
    base = next(iter(widened.values())).layout.intermediate
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    field = experts_size_field(config, base)
    if field is None:
        raise ValueError(
            f"Cannot merge: no field of {type(config).__name__} holds the experts' intermediate size {base} (tried "
            f"{list(EXPERTS_SIZE_FIELDS)}), so the merged checkpoint would not load."
        )
    return field, next(iter(sizes.values()))
