"""Finding a model's FFNs by their shape, for families the table (``architectures.FFN_LAYOUTS``) does not list.

An FFN is ``out(act(in_1(x)) * in_2(x) ...)``: input projections read the hidden size ``d`` and write the intermediate
size ``I`` (a fused ``[gate; up]`` projection writes ``2 I``), one output projection reads ``I`` and writes ``d``, and
what lies between them is elementwise. ``find_ffn`` looks for exactly that, per parent module:

1. shape: the linear layers (``nn.Linear``, bitsandbytes' subclasses of it, GPT-2's ``Conv1D``) directly under one
   parent that read ``d`` and write ``p * I`` (``p`` = 1 or 2 packed parts), and exactly one that reads ``I`` and
   writes ``d`` (projections alone under their parent, as BERT's ``intermediate.dense`` / ``output.dense``, are
   grouped one level up, or with the projections of that level: CPM-Ant keeps its inputs in ``ffn.w_in`` and its
   output in ``ffn``, ``_join_key``). A mixture-of-experts router (``d -> num_experts``) has no output projection
   next to it, so it is never taken for an FFN; each expert of a ``ModuleList`` and a shared expert are MLPs of their
   own.
2. behaviour, checked, not assumed (``_check_elementwise``): the parent is run on a small random input with hooks
   that add a bump to intermediate feature ``j`` of every input projection's output; the output projection's input
   must change in feature ``j`` and in no other. Attention (softmax over positions, heads mixing) fails this check,
   or cannot be called with the hidden states alone; either way it is not an FFN. Every projection must run exactly
   once per call (a projection read twice would carry the new features twice). An MLP that needs more than the
   hidden states (BLOOM's takes the residual) is probed inside a forward pass of the whole model; MLPs of the same
   structure (every layer's, every expert's) are probed once.

The result is a set of module-name suffixes (the shortest that match the found projections and nothing else), in
the form ``ScaleConfig`` takes them (``target_modules``, ``ffn_output_modules``, ``ffn_fused_modules``). Detection
reads the model only; hooks are removed before it returns.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import INTERMEDIATE_SIZE_FIELDS

_BUMP = 3.0  # added to one intermediate feature by the elementwise check


@dataclass(frozen=True)
class DetectedFfn:
    """The FFN projections found in a model, as module-name suffixes.

    Args:
        input_modules: suffixes of the input projections (new output rows).
        output_modules: suffixes of the output projections (new input columns).
        fused_modules: input projections that pack several projections in their output, with the number of parts.
        mlps: the full names of the parent modules found to be FFNs.
    """

    input_modules: tuple[str, ...]
    output_modules: tuple[str, ...]
    fused_modules: dict[str, int] = field(default_factory=dict)
    mlps: tuple[str, ...] = ()

    @property
    def target_modules(self) -> list[str]:
        return [*self.input_modules, *self.output_modules]


def is_linear(module: nn.Module) -> bool:
    """A layer SCALE can widen: ``nn.Linear`` (bitsandbytes' layers subclass it) or GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of the matrix (``quantized.weight_shape``, without importing it)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return tuple(module.weight.shape[::-1])


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream: the config's ``hidden_size`` (ELECTRA's embedding is narrower), else the
    input embedding's width."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if isinstance(size, int):
        return size
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        raise ValueError(
            f"SCALE could not find the FFN of {type(model).__name__} by its shape: it has no config.hidden_size and "
            "no input embedding to read the hidden size from. Name the FFN yourself: ScaleConfig(ffn_expansion=..., "
            "target_modules=[<input projections>, <output projection>], ffn_output_modules=[<output projection>])."
        )
    return embedding.weight.shape[1]


@dataclass
class _Candidate:
    parent: str
    inputs: list[tuple[str, int]]  # (name, packed parts)
    outputs: list[str]
    intermediate: int
    reason: str = ""  # why it was rejected, if it was


def _shape_candidates(model: nn.Module, hidden: int) -> list[_Candidate]:
    """Per parent module, the linear layers that fit ``d -> p*I`` and ``I -> d``. Projections left alone under their
    parent (BERT keeps ``intermediate.dense`` and ``output.dense`` in two modules) are grouped one level up."""
    by_parent: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        if is_linear(module) and _shape(module)[0] != _shape(module)[1]:
            by_parent[name.rpartition(".")[0]].append((name, module))
    partial = []
    for parent, children in by_parent.items():
        shapes = [_shape(m) for _, m in children]
        if not (any(out == hidden for out, _ in shapes) and any(inp == hidden for _, inp in shapes)):
            partial.append(parent)
    leftovers: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for parent in partial:
        leftovers[_join_key(parent, partial)].extend(by_parent.pop(parent))
    candidates = []
    for parent, children in [*by_parent.items(), *leftovers.items()]:
        outputs = [(n, _shape(m)[1]) for n, m in children if _shape(m)[0] == hidden]
        reads_hidden = [(n, _shape(m)[0]) for n, m in children if _shape(m)[1] == hidden]
        if not outputs or not reads_hidden:
            continue
        sizes = {size for _, size in outputs}
        if len(sizes) > 1:
            reason = "several projections write the hidden size, reading different sizes"
            candidates.append(_Candidate(parent, [], [n for n, _ in outputs], 0, reason))
            continue
        intermediate = sizes.pop()
        inputs = [(n, out // intermediate) for n, out in reads_hidden if out in (intermediate, 2 * intermediate)]
        candidate = _Candidate(parent, inputs, [n for n, _ in outputs], intermediate)
        if not inputs:
            candidate.reason = f"no projection {hidden} -> {intermediate} (or a packed 2 x {intermediate}) next to it"
        elif len(outputs) > 1:
            candidate.reason = f"ambiguous: several output projections {intermediate} -> {hidden}"
        candidates.append(candidate)
    return candidates


def _join_key(parent: str, partial: list[str]) -> str:
    """Where the projections of ``parent``, which holds only part of an MLP, are grouped with the rest: one level up
    (BERT's ``layer.N.intermediate`` and ``layer.N.output`` under ``layer.N``), or at ``parent`` itself when the
    projections of a module below it come up to join its own (CPM-Ant's ``ffn.w_in.w_0`` / ``w_1`` next to
    ``ffn.w_out``)."""
    if any(other.rpartition(".")[0] == parent for other in partial):
        return parent
    return parent.rpartition(".")[0]


def _structure(model: nn.Module, candidate: _Candidate) -> tuple:
    """What makes two candidates the same MLP in another layer or expert: names without indices, classes, shapes."""
    names = [name for name, _ in candidate.inputs] + candidate.outputs
    return tuple(
        (re.sub(r"\.\d+(?=\.|$)", ".*", name), type(module).__name__, _shape(module))
        for name, module in ((name, model.get_submodule(name)) for name in names)
    )


@torch.no_grad()
def _check_elementwise(model: nn.Module, candidate: _Candidate, hidden: int) -> str:
    """Run the parent on a random input, bumping intermediate feature ``j`` of the input projections' outputs; the
    output projection's input must change in feature ``j`` only. Returns ``""`` if so, else why not."""
    parent = model.get_submodule(candidate.parent)
    modules = {name: model.get_submodule(name) for name, _ in candidate.inputs}
    output = model.get_submodule(candidate.outputs[0])
    weight = next((p for p in parent.parameters() if p.is_floating_point()), None)
    if weight is None or weight.device.type == "meta":
        return "its weights are not in memory (meta device)"
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    x = torch.randn(1, 3, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
    size = candidate.intermediate
    parts = dict(candidate.inputs)
    calls: dict[str, int] = defaultdict(int)
    seen: list[torch.Tensor] = []
    bump: list[Optional[int]] = [None]

    def bump_output(name):
        def hook(module, args, out):
            calls[name] += 1
            if bump[0] is None or not isinstance(out, torch.Tensor):
                return None
            out = out.clone()
            for p in range(parts[name]):
                out[..., p * size + bump[0]] += _BUMP
            return out

        return hook

    def record_input(module, args):
        calls[candidate.outputs[0]] += 1
        seen.append(args[0].detach().float().clone())

    handles = [module.register_forward_hook(bump_output(name)) for name, module in modules.items()]
    handles.append(output.register_forward_pre_hook(record_input))
    was_training = model.training
    model.eval()
    ids = torch.arange(3, device=weight.device)[None]  # token ids 0, 1, 2 (for the whole model)
    try:
        # The MLP on hidden states; if it needs more (BLOOM's and MPT's take the residual too), the whole model.
        for run in (lambda: parent(x), lambda: model(ids)):
            calls.clear(), seen.clear()
            bump[0] = None
            try:
                run()
            except Exception as error:  # noqa: BLE001 (what cannot be run this way is tried the next way)
                failure = f"cannot be run on hidden states alone nor within the model ({type(error).__name__})"
                continue
            for j in (0, size - 1):
                bump[0] = j
                run()
            failure = ""
            break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if failure:
        return failure
    if any(count != 3 for count in calls.values()) or len(calls) != len(modules) + 1:
        return "its projections do not each run exactly once per call"
    base = seen[0]
    for j, bumped in zip((0, size - 1), seen[1:]):
        if bumped.shape[-1] != size:
            return f"the output projection reads {bumped.shape[-1]} features, not {size}"
        changed = (bumped != base).flatten(0, -2).any(0)
        if changed[torch.arange(size) != j].any():
            return "not elementwise between the projections (a change in one intermediate feature moved others)"
        if not changed[j]:
            return "the input projections' outputs do not reach the output projection"
    return ""


def _shortest_suffixes(names: set[str], all_names: list[str]) -> set[str]:
    """For each name, its shortest dotted suffix that matches (PEFT's rule) only names in ``names``."""
    suffixes = set()
    for name in names:
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            matches = [n for n in all_names if n == suffix or n.endswith("." + suffix)]
            if all(n in names for n in matches):
                suffixes.add(suffix)
                break
    return suffixes


def find_ffn(model: nn.Module, experts_found: bool = False) -> Optional[DetectedFfn]:
    """The FFN projections of ``model``, found by shape and checked to be elementwise (see the module docstring).

    ``experts_found``: ``peft_scale.experts`` found the model's fused 3-D experts (and widens them); the dense MLPs
    found here are widened beside them, and a model with no dense MLP gives ``None``.

    Raises:
        ValueError: no FFN found (the message lists what was looked for and the candidates seen), or a candidate is
            ambiguous (the message names it and the ``target_modules`` to pass instead), or the model keeps its
            experts as fused 3-D parameters.
    """
    hidden = hidden_size(model)
    candidates = _shape_candidates(model, hidden)
    found: list[_Candidate] = []
    checked: dict[tuple, str] = {}  # one check per structure: every layer's (and expert's) MLP is the same code
    for candidate in candidates:
        if not candidate.reason:
            structure = _structure(model, candidate)
            if structure not in checked:
                checked[structure] = _check_elementwise(model, candidate, hidden)
            candidate.reason = checked[structure]
        if candidate.reason.startswith("ambiguous"):
            raise ValueError(
                f"SCALE cannot tell the FFN of {candidate.parent!r} by its shape: {candidate.reason} "
                f"({candidate.outputs}). Name the projections yourself: ScaleConfig(ffn_expansion=..., "
                "target_modules=[<input projections>, <output projection>], ffn_output_modules=[<output projection>])."
            )
        if not candidate.reason:
            found.append(candidate)
    fused = fused_expert_parameters(model, hidden)
    if fused and not experts_found:
        _fused_experts_error(model, fused, found)
    if not found and experts_found:
        return None
    if not found:
        seen = "; ".join(f"{c.parent or '<root>'}: {c.reason}" for c in candidates[:8]) or "none"
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if is_linear(m)})
        raise ValueError(
            f"SCALE could not find the FFN of {type(model).__name__} by its shape. It looked, under each module, for "
            f"linear layers reading the hidden size {hidden} and writing an intermediate size I (or a packed 2 x I), "
            f"and one reading I and writing {hidden}, with an elementwise activation between them. Candidates seen: "
            f"{seen}. Linear layers in this model: {linear}. Name the FFN yourself: ScaleConfig(ffn_expansion=..., "
            "target_modules=[<input projections>, <output projection>], ffn_output_modules=[<output projection>])."
        )
    all_names = [name for name, _ in model.named_modules()]
    input_names = {name for c in found for name, _ in c.inputs}
    output_names = {name for c in found for name in c.outputs}
    inputs = _shortest_suffixes(input_names, all_names)
    fused_suffixes = _shortest_suffixes({name for c in found for name, parts in c.inputs if parts > 1}, all_names)
    return DetectedFfn(
        input_modules=tuple(sorted(inputs)),
        output_modules=tuple(sorted(_shortest_suffixes(output_names, all_names))),
        fused_modules={suffix: 2 for suffix in sorted(fused_suffixes)},
        mlps=tuple(c.parent for c in found),
    )


def fused_expert_parameters(model: nn.Module, hidden: int) -> list[str]:
    """Names of 3-D parameters with a hidden-size dimension: experts kept fused as ``(E, 2I, d)`` / ``(E, d, I)``."""
    return [
        name
        for name, param in model.named_parameters()
        if param.dim() == 3 and param.shape[0] > 1 and hidden in param.shape[1:] and min(param.shape[1:]) > 1
    ]


def _fused_experts_error(model: nn.Module, fused: list[str], dense: list) -> None:
    """3-D parameters that look like fused experts, in a module ``peft_scale.experts`` does not recognise."""
    raise ValueError(
        f"SCALE FFN mode cannot widen {type(model).__name__}: its experts are fused 3-D parameters "
        f"({fused[:2]}{' ...' if len(fused) > 2 else ''}), which SCALE does not widen; widening only its dense MLPs "
        f"({len(dense)} found) would leave the experts at their old size."
    )


def join_split_mlps(blocks: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """``{parent: {"inputs": [...], "outputs": [...]}}`` with parents that hold only inputs and parents that hold only
    outputs joined where together they make an MLP (BERT's ``layer.N.intermediate.dense`` and
    ``layer.N.output.dense`` are one MLP of ``layer.N``), as ``find_ffn`` groups them (``_join_key``). A part left
    alone stays as it was (so an MLP matched in part is reported under its own name)."""
    whole = {parent: block for parent, block in blocks.items() if block["inputs"] and block["outputs"]}
    partial_parents = [parent for parent in blocks if parent not in whole]
    partial: dict[str, list[str]] = defaultdict(list)
    for parent in partial_parents:
        partial[_join_key(parent, partial_parents)].append(parent)
    for key, parents in partial.items():
        inputs = [item for parent in parents for item in blocks[parent]["inputs"]]
        outputs = [item for parent in parents for item in blocks[parent]["outputs"]]
        if inputs and outputs:
            whole[key] = {"inputs": inputs, "outputs": outputs}
        else:
            whole.update({parent: blocks[parent] for parent in parents})
    return whole


# ----------------------------------------------------------------------------------------- the merged config


def intermediate_size_fields(model_config, size: int, table_field: Optional[str] = None) -> list[tuple[object, str]]:
    """The config attributes that hold the intermediate size ``size``, as ``(config, name)`` (the text config of a
    composite model): the table's field (a verified family; GPT-2's ``n_inner`` may be ``None``: 4 d), else the
    first of ``INTERMEDIATE_SIZE_FIELDS`` equal to ``size``, else every attribute named like an FFN size whose value
    is ``size`` (an encoder-decoder config's ``decoder_ffn_dim`` and ``encoder_ffn_dim``); empty if none."""
    if table_field is not None:
        return [(model_config, table_field)]
    configs = [model_config]
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if text is not model_config:
        configs.append(text)
    for config in configs:
        for name in INTERMEDIATE_SIZE_FIELDS:
            if getattr(config, name, None) == size:
                return [(config, name)]
    words = ("intermediate", "ffn", "inner", "mlp", "d_ff", "dff", "expert")
    return [
        (config, name)
        for config in configs
        for name, value in vars(config).items()
        if isinstance(value, int) and not isinstance(value, bool) and value == size and any(w in name for w in words)
    ]
