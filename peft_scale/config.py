"""``ScaleConfig``: what SCALE does to a model, as a JSON-serialisable ``PeftConfig``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .registration import SCALE_TYPE_NAME, add_peft_type_member

INIT_METHODS = ("svd", "normal")
VARIANTS = ("preserve", "adapt", "route")
ADAPT_MODULES = ("all", "attention", "ffn")


@dataclass
class ScaleConfig(PeftConfig):
    """Configuration of a SCALE width expansion.

    SCALE widens the linear layers of a frozen pre-trained model with new blocks ``[[W, W12], [W21, W22]]``.
    In FFN mode (``hidden_expansion=0``), every MLP gets ``ffn_expansion`` new intermediate neurons: its input
    projections (``gate``/``up``) get new output rows ``W21`` and its output projection (``down``) gets new
    input columns ``W12``, initialised to zero, so the model computes exactly what it did before until training
    moves ``W12``. With ``hidden_expansion > 0`` the whole decoder is widened: the residual stream, attention
    (whole new heads), the FFN, the embedding and the LM head's input. The pre-trained weights are frozen and
    never modified.

    Args:
        ffn_expansion: number of new intermediate neurons added to every targeted MLP.
        hidden_expansion: ``d_up``, new features of the residual stream (full-width SCALE; llama, mistral, qwen2,
            qwen3). Must be a whole number of attention heads, and of heads per key-value head under
            grouped-query attention (SmolLM2-135M: multiples of 64 x 3 = 192).
        variant: which ``W12`` blocks (new -> original features) exist and train. ``"adapt"`` (default): those of
            the layers from ``preserve_layers`` up, in ``adapt_modules``. ``"preserve"``: none (full width only):
            the original features are the base model's forever, and new knowledge reaches the logits only through
            the LM head's new block. ``"route"``: the body of ``"adapt"`` plus a preservation head (the base model's
            own logits, from a copy of the original features that only frozen weights touch) and per-token
            routing between the two heads by their cosine (full width only).
        preserve_layers: ``L_fp``: the bottom layers whose ``W12`` stay frozen at zero (adapt, route).
        adapt_modules: where ``W12`` opens above ``preserve_layers``: ``"all"``, ``"attention"`` or ``"ffn"``
            (the paper finds opening only upper-layer attention forgets least).
        route_threshold: ``tau``: a token takes the preservation logits when ``cos(z_pres, z_adapt) >= tau``.
        route_in_training: also route during training (default: train on the adaptation logits and route at
            evaluation and generation). Tokens routed to the preservation head give no gradient, and at
            initialisation every token is (the two heads agree exactly): a new adapter does not train with it
            (a warning says so); it is for continuing to train an adapter whose heads already differ.
        target_modules: names (or a regex) of the FFN projections to widen. Default: the architecture's FFN
            projections from ``peft_scale.architectures.FFN_LAYOUTS``. Every MLP must be targeted whole (its
            input projections and its output projection), or injection fails.
        ffn_output_modules: which of ``target_modules`` are FFN *output* projections (their input is widened;
            e.g. ``["down_proj"]``). Every other target is an FFN input projection (its output is widened).
            Default: from the architecture table; required for an architecture the table does not know.
        ffn_fused_modules: input projections that pack several projections side by side in their output,
            mapped to the number of parts (``{"gate_up_proj": 2}`` for Phi-3). Default: from the table.
        exclude_modules: names (or a regex) of modules not to widen.
        layers_to_transform: indices of the decoder layers to widen (default: all).
        layers_pattern: the name of the layer list, when ``layers_to_transform`` cannot find it by itself.
        init: how the new rows ``W21`` start. ``"svd"`` (default): random rows in the principal input subspace of
            the base weight, scaled by its singular values (see ``peft_scale.layer.init_rows_svd``); ``"normal"``:
            i.i.d. normal entries with the base weight's standard deviation. The zero block ``W12`` always starts
            at zero, which is what keeps the output unchanged at initialisation.
        modules_to_save: extra modules to train fully and save with the adapter (as in every PEFT method).
        trainable_token_indices: token ids whose embeddings are trained (PEFT's trainable tokens; TRL sets it
            when it adds chat-template tokens).
        base_ffn_shapes: filled in by ``get_peft_model``: the ``[input, intermediate]`` sizes of the base model's
            widened FFNs. Loading the adapter into a base model with other sizes is an error that says so.
    """

    ffn_expansion: int = field(
        default=0, metadata={"help": "Number of new intermediate neurons added to every targeted MLP."}
    )
    hidden_expansion: int = field(
        default=0,
        metadata={"help": "New residual-stream features (full-width SCALE); whole heads in the base group ratio."},
    )
    variant: Literal["preserve", "adapt", "route"] = field(
        default="adapt", metadata={"help": "Which W12 blocks train: 'preserve', 'adapt' (default) or 'route'."}
    )
    preserve_layers: int = field(
        default=0, metadata={"help": "Bottom layers whose W12 stay frozen at zero (adapt, route)."}
    )
    adapt_modules: Literal["all", "attention", "ffn"] = field(
        default="all", metadata={"help": "Where W12 opens above preserve_layers: 'all', 'attention' or 'ffn'."}
    )
    route_threshold: float = field(
        default=0.5, metadata={"help": "Route: a token takes the preservation head when cos(z_pres, z_adapt) >= tau."}
    )
    route_in_training: bool = field(
        default=False, metadata={"help": "Route: also route in training (default: train on the adaptation head)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "FFN projections to widen (names or a regex). Default: the architecture's FFN projections. "
            "Each MLP must be targeted whole."
        },
    )
    ffn_output_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Which targets are FFN output projections (their input is widened), e.g. ['down_proj']. "
            "Default: from the architecture table."
        },
    )
    ffn_fused_modules: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "Input projections that pack several projections in their output, with the number of parts, "
            "e.g. {'gate_up_proj': 2}. Default: from the architecture table."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to widen (names or a regex)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the decoder layers to widen (default: all)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    init: Literal["svd", "normal"] = field(
        default="svd",
        metadata={"help": "Initialisation of the new rows W21: 'svd' (default) or 'normal'. W12 always starts at 0."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token ids whose embeddings are trained (PEFT trainable tokens)."}
    )

    base_ffn_shapes: Optional[list[list[int]]] = field(
        default=None,
        metadata={"help": "Filled in at injection: [input, intermediate] sizes of the widened FFNs, checked on load."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type_member(SCALE_TYPE_NAME)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.ffn_output_modules, str):
            self.ffn_output_modules = [self.ffn_output_modules]
        for name in ("ffn_expansion", "hidden_expansion", "preserve_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ScaleConfig({name}={value!r}): must be a non-negative integer.")
        if self.ffn_expansion == 0 and self.hidden_expansion == 0:
            raise ValueError(
                "ScaleConfig needs something to widen: ffn_expansion > 0 (new FFN neurons per MLP, e.g. "
                "ScaleConfig(ffn_expansion=64)) and/or hidden_expansion > 0 (new residual-stream features)."
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"ScaleConfig(variant={self.variant!r}): choose one of {list(VARIANTS)}.")
        if self.adapt_modules not in ADAPT_MODULES:
            raise ValueError(f"ScaleConfig(adapt_modules={self.adapt_modules!r}): choose one of {list(ADAPT_MODULES)}.")
        if self.hidden_expansion == 0 and self.variant != "adapt":
            raise ValueError(
                f"ScaleConfig(variant={self.variant!r}) needs hidden_expansion > 0: in FFN mode the only path from the "
                "new neurons to the output is the W12 block of the FFN output projection, which SCALE-Adapt opens "
                "(variant='adapt', preserve_layers=...)."
            )
        if self.hidden_expansion == 0 and self.adapt_modules == "attention":
            raise ValueError(
                "ScaleConfig(adapt_modules='attention') needs hidden_expansion > 0: FFN mode widens no attention."
            )
        if self.init not in INIT_METHODS:
            raise ValueError(f"ScaleConfig(init={self.init!r}): choose one of {list(INIT_METHODS)}.")
        if self.variant == "route" and self.route_in_training:
            warnings.warn(
                "ScaleConfig(route_in_training=True): a token routed to the preservation head (the frozen base model) "
                "gives no gradient, and a new adapter's two heads agree exactly (cos = 1 >= route_threshold), so every "
                "token is routed there and nothing trains. Use it only to continue training an adapter whose heads "
                "already differ; to train a new one, leave it False (training uses the adaptation head).",
                UserWarning,
                stacklevel=3,
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("ScaleConfig: `layers_pattern` only has an effect together with `layers_to_transform`.")
        if self.ffn_fused_modules:
            for name, parts in self.ffn_fused_modules.items():
                if not isinstance(parts, int) or parts < 1:
                    raise ValueError(
                        f"ScaleConfig(ffn_fused_modules={{{name!r}: {parts!r}}}): the number of packed projections "
                        "must be a positive integer (2 for a fused [gate; up] projection)."
                    )
