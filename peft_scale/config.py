"""``ScaleConfig``: what SCALE does to a model, as a JSON-serialisable ``PeftConfig``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .peft_type import SCALE_TYPE_NAME, add_peft_type_member

INIT_METHODS = ("svd", "normal")
VARIANTS = ("preserve", "adapt", "route")
ADAPT_MODULES = ("all", "attention", "ffn")
ROUTE_RULES = ("learned", "cosine")
ROUTER_GATES = ("hard", "soft")  # RouterConfig.gate: how much of the expansion a routed token gets
CALIBRATIONS = ("cross_fitted", "held_out", "fitted")  # RouterConfig.calibrate_on
# RouterConfig(max_old_error=None): by the router's old side. Text of what must be kept bounds the forgetting itself;
# the base model's own samples are a rougher stand-in for it (its held-out share says less about the text to keep),
# and a tight bound on them sends much new text to the base model for little gain (docs: the router's evidence).
DEFAULT_MAX_OLD_ERROR = {"old data": 0.005, "base model samples": 0.05}

@dataclass
class RouterConfig:
    """The learned router of SCALE-Route: present (``ScaleConfig(router=RouterConfig())``) means learned routing.

    A small MLP reads the stream entering layer ``preserve_layers`` (the base model's own hidden state there: nothing
    below that layer changes it) and scores each token ``p`` in ``[0, 1]``; ``peft_scale.fit_router`` trains it, before
    the adapter trains, to tell the new data's tokens from the old side's, and sets the threshold ``tau`` so that at
    most ``max_old_error`` of the old side's tokens reach the expansion. A token below the threshold gets nothing of
    the expansion (every ``W12`` and the LM head's new block are multiplied by its gate ``g = 0``): it computes the
    base model's function, in training, evaluation and generation. The defaults are the settings that met the
    project's goals (docs: the router's evidence page); each field says what it does.

    Args:
        hidden: the router's hidden width (``d -> hidden -> 1`` over the RMS-normalised stream); 0 makes it a linear
            probe, which tells languages apart but not which entity a token is about.
        smoothing: ``a`` in ``[0, 1)``: the router decides on an exponential moving average of its logit over the
            preceding tokens of the same sequence, ``s_0 = l_0, s_t = a s_{t-1} + (1 - a) l_t``, token ``t`` to the
            expansion iff ``sigmoid(s_t) >= tau``. Causal, so training, evaluation and cached generation decide
            alike; padding marked by the ``attention_mask`` does not enter it. 0 decides on each token's own logit.
        gate: how much of the expansion a token above the threshold gets. ``"soft"``: ``g = (p - tau) / (1 - tau)``,
            as a mixture of experts weighs its experts: an old token routed by mistake mostly scores just above the
            threshold and gets little. ``"hard"``: ``g = 1``.
        preservation_copy: in inference (no gradient recorded), carry the base model's own stream beside the adapted
            one above ``preserve_layers`` (``peft_scale.preservation_copy``), so that a token routed to the base model
            gets exactly the base model's logits inside a mixed sequence too (its attention reads the base model's
            keys and values of the earlier tokens). Costs up to one more run of the layers above ``preserve_layers``,
            and nothing while no token of the sequence has gone to the expansion. Training is the same either way.
        calibrate_on: where ``fit_router`` measures ``max_old_error``. ``"cross_fitted"``: on every old sequence,
            each scored by one of five routers fitted on the other four fifths (a steady bound for old text the router
            has not seen, read off five times as many tokens as a held-out fifth). ``"held_out"``: on a fifth of the
            old sequences the router was not fitted on. ``"fitted"``: on all the old data, scored by the kept router
            (the old data *is* what must be kept: a set of facts, a regression set).
        max_old_error: the share of old tokens allowed to reach the expansion, which sets the threshold. ``None``:
            ``DEFAULT_MAX_OLD_ERROR``, by what the old side is (text of what must be kept, or the base model's own
            samples, a rougher stand-in for it whose errors cost less). ``fit_router(max_old_error=...)`` overrides it
            for one fit; the value used is in the adapter's ``router_report``.
        seed: the seed of ``fit_router``'s split of the sequences, the router's initialisation and the sampling of the
            old side: the same config and data give the same router.
        outranks: filled in by ``fit_router``: the other learned-route adapters whose domains this router was fitted
            against (``other_domains``, by their names). Routed together, a token both claim goes to this adapter.
        smoothing_fall: the average's coefficient while a token's logit is below it (``None``: ``smoothing`` both
            ways). Kept for adapters saved by peft-scale 0.1.0, which load and route as they did; a new config
            refuses it (why: docs/router.md, "Changed in 0.2").
        smoothing_start: ``"old"``: the average starts from the old side's median logit. Kept, and refused on a new
            config, as ``smoothing_fall``.
    """

    hidden: int = field(default=64, metadata={"help": "Router MLP hidden width (0: a linear probe)."})
    smoothing: float = field(
        default=0.8,
        metadata={"help": "EMA coefficient a in [0, 1) of the router's logit along the sequence (0: per token)."},
    )
    gate: Literal["hard", "soft"] = field(
        default="soft",
        metadata={"help": "'soft': g = (p - tau) / (1 - tau) above the threshold; 'hard': g = 1."},
    )
    preservation_copy: bool = field(
        default=True,
        metadata={"help": "Inference: carry the base model's stream so base-routed tokens are exact in mixed text."},
    )
    calibrate_on: Literal["cross_fitted", "held_out", "fitted"] = field(
        default="cross_fitted",
        metadata={"help": "Where fit_router measures max_old_error: 'cross_fitted', 'held_out' or 'fitted'."},
    )
    max_old_error: Optional[float] = field(
        default=None,
        metadata={"help": "Share of old tokens allowed to reach the expansion (None: by what the old side is)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of fit_router's split, initialisation and sampling."})
    outranks: list[str] = field(
        default_factory=list,
        metadata={"help": "Filled in by fit_router: adapters whose domains this router was fitted against."},
    )
    smoothing_fall: Optional[float] = field(
        default=None, metadata={"help": "Kept for adapters saved by 0.1.0 (refused on a new config)."}
    )
    smoothing_start: Literal["token", "old"] = field(
        default="token", metadata={"help": "Kept for adapters saved by 0.1.0 (refused on a new config)."}
    )

    def __post_init__(self):
        hidden = self.hidden
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0:
            raise ValueError(f"RouterConfig(hidden={hidden!r}): a non-negative integer (0: a linear probe).")
        smoothing = self.smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ValueError(
                f"RouterConfig(smoothing={smoothing!r}): the moving average's coefficient a must be a number in "
                "[0, 1) (s_t = a s_(t-1) + (1 - a) l_t; 0 decides per token)."
            )
        self.smoothing = float(smoothing)
        if self.gate not in ROUTER_GATES:
            raise ValueError(
                f"RouterConfig(gate={self.gate!r}): choose 'soft' (a routed token gets (p - tau) / (1 - tau) of the "
                "expansion) or 'hard' (all of it)."
            )
        if not isinstance(self.preservation_copy, bool):
            raise ValueError(f"RouterConfig(preservation_copy={self.preservation_copy!r}): pass True or False.")
        if self.calibrate_on not in CALIBRATIONS:
            raise ValueError(
                f"RouterConfig(calibrate_on={self.calibrate_on!r}): choose 'cross_fitted' (the bound measured on every "
                "old sequence, out of fold), 'held_out' (on a held-out fifth) or 'fitted' (on the old data given)."
            )
        error = self.max_old_error
        if error is not None and (isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 < error < 0.5):
            raise ValueError(
                f"RouterConfig(max_old_error={error!r}): a share between 0 and 0.5 (e.g. 0.005), or None (by what the "
                f"old side is: {DEFAULT_MAX_OLD_ERROR})."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"RouterConfig(seed={self.seed!r}): an integer.")
        if isinstance(self.outranks, str) or not all(isinstance(name, str) for name in self.outranks):
            raise ValueError(f"RouterConfig(outranks={self.outranks!r}): a list of adapter names.")
        self.outranks = list(self.outranks)
        fall = self.smoothing_fall
        if fall is not None:
            if isinstance(fall, bool) or not isinstance(fall, (int, float)) or not 0 <= fall < 1:
                raise ValueError(f"RouterConfig(smoothing_fall={fall!r}): a number in [0, 1), or None.")
            if not self.smoothing:
                raise ValueError(f"RouterConfig(smoothing_fall={fall}) needs smoothing > 0.")
            self.smoothing_fall = float(fall)
        if self.smoothing_start not in ("token", "old"):
            raise ValueError(f"RouterConfig(smoothing_start={self.smoothing_start!r}): 'token' or 'old'.")
        if self.smoothing_start == "old" and not self.smoothing:
            raise ValueError("RouterConfig(smoothing_start='old') needs smoothing > 0.")

    def uses_legacy_options(self) -> bool:
        """Whether an option kept only for adapters saved by 0.1.0 is set."""
        return self.smoothing_fall is not None or self.smoothing_start != "token"


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
        ffn_expansion: number of new intermediate neurons added to every targeted MLP (to every expert of a
            mixture of experts; an MLP that holds several shared experts side by side, as Aria's, gets that many
            times more: ``architectures.FFN_EXPANSION_MULTIPLES``).
        hidden_expansion: ``d_up``, new features of the residual stream (full-width SCALE; llama, mistral, qwen2,
            qwen3, gemma, gemma2, gemma3_text, granite, olmo2, starcoder2: ``FULL_WIDTH_LAYOUTS``; phi3 and stablelm
            are refused). Must be a whole number of attention heads, and of heads per key-value head under
            grouped-query attention (SmolLM2-135M: multiples of 64 x 3 = 192).
        variant: which ``W12`` blocks (new -> original features) exist and train. ``"adapt"`` (default, or
            ``"route"`` when ``router`` is given): those of the layers from ``preserve_layers`` up, in ``adapt_modules``. ``"preserve"``: none (full width only):
            the original features are the base model's forever, and new knowledge reaches the logits only through
            the LM head's new block. ``"route"``: the body of ``"adapt"``, switched per token by ``route_rule``
            between the expansion and the base model.
        route_rule: how ``"route"`` decides, per token. ``"learned"`` (default): a router fitted once with
            ``peft_scale.fit_router`` tells new-domain tokens from old ones on the stream entering layer
            ``preserve_layers`` (the base model's own hidden state there); a token routed to the base model gets
            nothing of the expansion, in training, evaluation and generation. FFN mode and full width. Its settings
            are ``router``. ``"cosine"``: the paper's rule (full width only): a preservation head (the base model's
            own logits, from a copy of the original features that only frozen weights touch) and the adaptation
            head, and a token takes the preservation logits when their cosine is at least ``route_threshold``.
        router: the learned router's settings (``RouterConfig``; a dict is read as one). Given, it makes the adapter
            a learned-route one (``variant="route"``); ``None`` with ``variant="route"`` and the learned rule:
            ``RouterConfig()``, the defaults.
        preserve_layers: ``L_fp``: the bottom layers whose ``W12`` stay frozen at zero (adapt, route). With the
            learned route, the router reads the stream entering this layer, and in FFN mode only the MLPs from this
            layer up are widened (the ones below could never reach the output).
        adapt_modules: where ``W12`` opens above ``preserve_layers``: ``"all"``, ``"attention"`` or ``"ffn"``
            (the paper finds opening only upper-layer attention forgets least).
        route_threshold: ``tau`` of the cosine rule: a token takes the preservation logits when
            ``cos(z_pres, z_adapt) >= tau``. (The learned router's threshold is chosen by ``fit_router``.)
        route_in_training: cosine rule: also route during training (default: train on the adaptation logits and route at
            evaluation and generation). Tokens routed to the preservation head give no gradient, and at
            initialisation every token is (the two heads agree exactly): a new adapter does not train with it
            (a warning says so); it is for continuing to train an adapter whose heads already differ.
        target_modules: names (or a regex) of the FFN projections to widen. Default: the architecture's FFN
            projections from ``peft_scale.architectures.FFN_LAYOUTS``, and every mixture-of-experts module whose
            experts are fused 3-D parameters (``peft_scale.experts``; each is a whole FFN by itself). Every MLP must
            be targeted whole (its input projections and its output projection), or injection fails.
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
            i.i.d. normal entries with the base weight's standard deviation. The block ``W12`` starts at zero
            (unless ``init_weights=False``), which is what keeps the output unchanged at initialisation.
        init_weights: ``True`` (default): the exact start above, every block that feeds the original features
            (``W12``, and in full width the LM head's new block ``P``) at zero, so the model computes exactly what
            the base model computes. ``False``, as PEFT's ``init_lora_weights=False``: those blocks, and ``b21``,
            are drawn at random instead, as torch draws a fresh ``nn.Linear`` over the widened input (uniform in
            ``±1/sqrt(in + in_expansion)``; for ``P``, ``±1/sqrt(d + d_up)``): the adapter changes the output from
            the first step. This breaks SCALE's preservation guarantee (the original computation is not reproduced
            at initialisation); it is for tests and debugging (PEFT's generic tests use it to check that merging,
            disabling and unloading do something).
        modules_to_save: extra modules to train fully and save with the adapter (as in every PEFT method).
        trainable_token_indices: token ids whose embeddings are trained (PEFT's trainable tokens; TRL sets it
            when it adds chat-template tokens).
        router_report: filled in by ``peft_scale.fit_router``: the learned router's held-out accuracy on each side,
            where its old side came from, and its threshold (the model card shows it); with one routed adapter per
            domain, ``claimed_by_other_adapters``: the share of its held-out new tokens each other fitted router
            claimed when it was fitted (``RouterReport``; absent from adapters saved before it existed), and
            ``other_to_expansion``: the share of each of ``fit_router``'s ``other_domains`` it claims (empty without
            them; absent from adapters saved before it existed).
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
    variant: Optional[Literal["preserve", "adapt", "route"]] = field(
        default=None,
        metadata={"help": "Which W12 blocks train: 'preserve', 'adapt' (the default; 'route' when router is given) or 'route'."},
    )
    preserve_layers: int = field(
        default=0, metadata={"help": "Bottom layers whose W12 stay frozen at zero (adapt, route)."}
    )
    adapt_modules: Literal["all", "attention", "ffn"] = field(
        default="all", metadata={"help": "Where W12 opens above preserve_layers: 'all', 'attention' or 'ffn'."}
    )
    route_rule: Literal["learned", "cosine"] = field(
        default="learned",
        metadata={"help": "Route: 'learned' (a router fitted with peft_scale.fit_router) or 'cosine' (the paper's)."},
    )
    router: Optional[Union[RouterConfig, dict]] = field(
        default=None,
        metadata={"help": "Learned route: the router's settings (RouterConfig); given, the adapter routes (variant 'route')."},
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
        metadata={"help": "Initialisation of the new rows W21: 'svd' (default) or 'normal' (W12: see init_weights)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True (default): W12 and the LM head's new block start at zero (exact preservation). False: drawn "
            "at random, so the adapter changes the output from the start (tests and debugging; breaks preservation)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token ids whose embeddings are trained (PEFT trainable tokens)."}
    )

    router_report: Optional[dict] = field(
        default=None,
        metadata={"help": "Filled in by fit_router: the learned router's held-out accuracy and threshold."},
    )
    base_ffn_shapes: Optional[list[list[int]]] = field(
        default=None,
        metadata={"help": "Filled in at injection: [input, intermediate] sizes of the widened FFNs, checked on load."},
    )
    ffn_found_by: Optional[Literal["table", "shape"]] = field(
        default=None,
        metadata={
            "help": "Filled in at injection when no module names were given: the FFN projections came from the "
            "family's row in FFN_LAYOUTS ('table') or were found by their shape ('shape')."
        },
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
        if self.variant is None:  # a router makes it a routed adapter; else SCALE-Adapt
            self.variant = "route" if self.router is not None else "adapt"
        if self.variant not in VARIANTS:
            raise ValueError(f"ScaleConfig(variant={self.variant!r}): choose one of {list(VARIANTS)}.")
        if self.adapt_modules not in ADAPT_MODULES:
            raise ValueError(f"ScaleConfig(adapt_modules={self.adapt_modules!r}): choose one of {list(ADAPT_MODULES)}.")
        if self.route_rule not in ROUTE_RULES:
            raise ValueError(f"ScaleConfig(route_rule={self.route_rule!r}): choose one of {list(ROUTE_RULES)}.")
        if self.hidden_expansion == 0 and self.variant == "preserve":
            raise ValueError(
                "ScaleConfig(variant='preserve') needs hidden_expansion > 0: in FFN mode the only path from the "
                "new neurons to the output is the W12 block of the FFN output projection, which SCALE-Adapt opens "
                "(variant='adapt', preserve_layers=...)."
            )
        if self.hidden_expansion == 0 and self.variant == "route" and self.route_rule == "cosine":
            raise ValueError(
                "ScaleConfig(variant='route', route_rule='cosine') needs hidden_expansion > 0: the cosine rule compares "
                "the preservation head with the adaptation head, which only full width has. In FFN mode use "
                "route_rule='learned' (the default) and fit the router with peft_scale.fit_router."
            )
        if self.variant == "route" and self.route_rule == "learned" and self.route_in_training:
            raise ValueError(
                "ScaleConfig(route_in_training=True) is an option of the cosine rule. The learned router gates "
                "training too (tokens routed to the base model give the expansion no gradient): leave it False."
            )
        if self.hidden_expansion == 0 and self.adapt_modules == "attention":
            raise ValueError(
                "ScaleConfig(adapt_modules='attention') needs hidden_expansion > 0: FFN mode widens no attention."
            )
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        if self.router is not None and not isinstance(self.router, RouterConfig):
            raise ValueError(
                f"ScaleConfig(router={self.router!r}): pass a peft_scale.RouterConfig (or a dict of its fields)."
            )
        if self.router is not None and not (self.variant == "route" and self.route_rule == "learned"):
            raise ValueError(
                f"ScaleConfig(router=RouterConfig(...)) sets a learned router, but this config has "
                f"variant={self.variant!r}, route_rule={self.route_rule!r}: leave variant unset (a router makes it "
                "'route'), or drop router."
            )
        if self.variant == "route" and self.route_rule == "learned" and self.router is None:
            self.router = RouterConfig()
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"ScaleConfig(init_weights={self.init_weights!r}): pass True (W12 starts at zero: exact preservation) "
                "or False (W12 random: for tests and debugging); the initialisation of W21 is `init`."
            )
        if self.init not in INIT_METHODS:
            raise ValueError(f"ScaleConfig(init={self.init!r}): choose one of {list(INIT_METHODS)}.")
        if self.variant == "route" and self.route_rule == "cosine" and self.route_in_training:
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


_dataclass_init = ScaleConfig.__init__

# peft-scale 0.1.0 kept the learned router's settings as flat ScaleConfig fields (now RouterConfig's), with these
# defaults: a saved 0.1.0 adapter that lacks one of them (saved before it existed) used this value.
LEGACY_ROUTER_FIELDS = {
    "router_hidden": ("hidden", 64),
    "router_smoothing": ("smoothing", 0.0),
    "router_smoothing_fall": ("smoothing_fall", None),
    "router_smoothing_start": ("smoothing_start", "token"),
    "router_preservation_copy": ("preservation_copy", False),
    "router_gate": ("gate", "hard"),
}


def _legacy_router(kwargs: dict) -> Optional[RouterConfig]:
    """The ``RouterConfig`` of a learned-route adapter saved by peft-scale 0.1.0 (its flat ``router_*`` fields, taken
    out of ``kwargs``), with 0.1.0's values where a field is missing, so that it loads and routes exactly as it did.
    The calibration it was fitted with and the adapters it outranks were in its ``router_report``."""
    flat = {key: kwargs.pop(key) for key in list(kwargs) if key in LEGACY_ROUTER_FIELDS}
    learned = kwargs.get("variant") == "route" and kwargs.get("route_rule", "cosine") == "learned"
    if not learned or "router" in kwargs:
        return kwargs.pop("router", None)
    report = kwargs.get("router_report") or {}
    return RouterConfig(
        **{field_name: flat.get(key, default) for key, (field_name, default) in LEGACY_ROUTER_FIELDS.items()},
        calibrate_on=report.get("calibrate_on", "held_out"),
        max_old_error=0.01,  # 0.1.0's fit_router default
        outranks=list(report.get("outranks", [])),
    )


def _init_with_saved_defaults(self, *args, **kwargs):
    # A config read back from adapter_config.json carries `peft_type` (a user never passes it). SCALE-Route adapters
    # saved before the learned router existed have no `route_rule` and used the cosine rule: they keep it, so that
    # they load and behave exactly as they did. A new ScaleConfig(variant="route") gets the learned rule.
    if "peft_type" in kwargs:
        if kwargs.get("variant") == "route" and "route_rule" not in kwargs:
            kwargs["route_rule"] = "cosine"
        kwargs["router"] = _legacy_router(kwargs)
    else:
        moved = [key for key in kwargs if key in LEGACY_ROUTER_FIELDS]
        if moved:
            fields = ", ".join(f"{LEGACY_ROUTER_FIELDS[key][0]}={kwargs[key]!r}" for key in moved)
            raise TypeError(
                f"ScaleConfig({moved[0]}=...): the learned router's settings moved into RouterConfig in peft-scale "
                f"0.2: pass ScaleConfig(..., router=peft_scale.RouterConfig({fields}))."
            )
        router = kwargs.get("router")
        if isinstance(router, dict):
            router = kwargs["router"] = RouterConfig(**router)
        if isinstance(router, RouterConfig) and router.uses_legacy_options():
            raise ValueError(
                "RouterConfig(smoothing_fall=..., smoothing_start='old') are kept only so that adapters saved by "
                "peft-scale 0.1.0 load and route as they did; a new adapter cannot set them (neither measured a gain "
                "on the continual pre-training benchmark). Leave them at their defaults."
            )
    _dataclass_init(self, *args, **kwargs)


ScaleConfig.__init__ = _init_with_saved_defaults
