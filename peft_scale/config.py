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
ROUTER_GATES = ("hard", "soft")  # router_gate: how much of the expansion a routed token gets


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
            qwen3, gemma, gemma2, gemma3_text, granite, olmo2, starcoder2: ``FULL_WIDTH_LAYOUTS``; phi3 and stablelm
            are refused). Must be a whole number of attention heads, and of heads per key-value head under
            grouped-query attention (SmolLM2-135M: multiples of 64 x 3 = 192).
        variant: which ``W12`` blocks (new -> original features) exist and train. ``"adapt"`` (default): those of
            the layers from ``preserve_layers`` up, in ``adapt_modules``. ``"preserve"``: none (full width only):
            the original features are the base model's forever, and new knowledge reaches the logits only through
            the LM head's new block. ``"route"``: the body of ``"adapt"``, switched per token by ``route_rule``
            between the expansion and the base model.
        route_rule: how ``"route"`` decides, per token. ``"learned"`` (default): a small router, fitted once with
            ``peft_scale.fit_router`` on the stream entering layer ``preserve_layers`` (the base model's own hidden
            state there), tells new-domain tokens from old ones; a token routed to the base model gets nothing of
            the expansion (every ``W12`` and the LM head's new block are multiplied by 0 for it), in training,
            evaluation and generation. FFN mode and full width. ``"cosine"``: the paper's rule (full width only):
            a preservation head (the base model's own logits, from a copy of the original features that only
            frozen weights touch) and the adaptation head, and a token takes the preservation logits when their
            cosine is at least ``route_threshold``.
        router_hidden: the learned router's hidden width (an MLP ``d -> router_hidden -> 1`` over the RMS-normalised
            stream); 0 makes it a linear probe. A linear probe tells languages apart but not which entity a token is
            about (measured: ``benchmarks/results/biography/findings.md``).
        router_smoothing: ``a`` in ``[0, 1)``, learned rule only: the router decides on an exponential moving average
            of its logit over the preceding tokens of the same sequence instead of on the token's own logit. Over the
            logits ``l_0, l_1, ...`` of one sequence's tokens::

                s_0 = l_0,    s_t = a s_{t-1} + (1 - a) l_t,    token t -> the expansion  <=>  sigmoid(s_t) >= threshold

            Causal (token ``t`` reads tokens ``<= t`` only), so training, evaluation and cached generation decide
            alike (the average's state is carried from one decoding call to the next, with the cache); padding
            marked by the ``attention_mask`` does not enter it (the average starts at each row's first real token).
            ``fit_router`` calibrates the threshold and reports on the smoothed scores. 0 (default): every token
            decides on its own logit. Measured (``benchmarks/results/continual_pretraining/cpu_40_steps/
            learned_router_findings.md``): ``a = 0.8`` at the same 1% error on old text sent 7x (old data as the old
            side) / 3x (base model samples) fewer new-language tokens to the base model.
        router_smoothing_start: where that average starts, with ``router_smoothing > 0``. ``"token"`` (default):
            ``s_0 = l_0``, the first token decides on its own logit (and the next few mostly on it). ``"old"``: from
            the logit of typical old text, ``s_-1 = c``, ``s_0 = a c + (1 - a) l_0``, with ``c`` the median of the
            router's logits on the old side's tokens (set by ``fit_router``): a sequence counts as old text until
            its tokens say otherwise (the pull fades as ``a^t``). A wrong "expansion" on old text costs forgetting,
            a wrong "base model" on new text only a little learning, and the first tokens, with the least context,
            are where the router errs most. Measured (``learned_router_findings.md``, fifth pass): with old data as
            the old side, 10.9% of the first 8 old-language tokens of each evaluation block reached the expansion
            from ``"token"``, none from ``"old"``, at the cost of the first ~4 new-language tokens of a sequence.
        router_smoothing_fall: with ``router_smoothing = a > 0``, the average's coefficient ``f`` in ``[0, 1)`` while a
            token's logit is below it: ``s_t = a_t s_{t-1} + (1 - a_t) l_t`` with ``a_t = f`` if ``l_t < s_{t-1}``
            else ``a`` (with the ``"old"`` start, ``s_{-1} = c`` counts as the previous value). ``None`` (default):
            ``a`` both ways. A smaller ``f`` falls towards the base model faster than it rises towards the
            expansion: after a switch from new-domain text back to old text inside one sequence, the old text
            leaves the expansion sooner (a wrong "expansion" on old text is the costly error). Measured on the
            routers alone (``cpu_40_steps/router_asymmetric.py``, ``a = 0.8``): ``f = 0.4`` sent 96% of Spanish
            tokens to the expansion (``a`` both ways: 97-98%, per token: 88-92%) and, after Spanish -> English,
            7% of the English to it (``a`` both ways: 11%, per token: 6-8%); not yet measured in training.
        router_preservation_copy: learned rule only, inference only (no gradient recorded): carry the base model's
            own stream beside the adapted one above ``preserve_layers`` (``peft_scale.preservation_copy``), so that a
            token routed to the base model gets exactly the base model's logits inside a mixed sequence too: its
            attention then reads the base model's keys and values of the earlier tokens, not the ones the expansion
            changed. Without it (default) only a sequence whose tokens all go to the base model is exact; after a
            switch from new-domain text to old text the old tokens drift (measured: about 0.05 nats per token).
            Costs up to one more run of the layers above ``preserve_layers`` (the batch is stacked with its copy),
            and nothing while no token of the sequence has gone to the expansion.
        router_gate: learned rule only: how much of the expansion a token the router sends there gets. ``"hard"``
            (default): all of it, ``g = 1`` (and ``g = 0`` below the threshold). ``"soft"``: in proportion to how far
            the router's score ``p`` clears its threshold ``tau``, ``g = (p - tau) / (1 - tau)`` (0 below it), as an
            MoE weighs its experts by their router's probability; in training and inference alike (the gradient a
            token gives the expansion is scaled by ``g`` too). An old token the router sends to the expansion by
            mistake mostly scores just above the threshold, a new one near 1 (SmolLM2, Spanish against English:
            mean ``g`` 0.50 on the misrouted English tokens, 0.99 on the Spanish ones), so the mistakes cost less
            forgetting at almost the same learning.
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
    variant: Literal["preserve", "adapt", "route"] = field(
        default="adapt", metadata={"help": "Which W12 blocks train: 'preserve', 'adapt' (default) or 'route'."}
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
    router_hidden: int = field(
        default=64, metadata={"help": "Learned route: hidden width of the router MLP (0: a linear probe)."}
    )
    router_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Learned route: EMA coefficient a in [0, 1) of the router's logit over the preceding tokens of the "
            "sequence (s_t = a s_{t-1} + (1-a) l_t); 0: each token decides on its own logit."
        },
    )
    router_smoothing_fall: Optional[float] = field(
        default=None,
        metadata={
            "help": "Learned route with router_smoothing > 0: the average's coefficient while a token's logit is below "
            "it (falling towards the base model), in [0, 1); None: router_smoothing both ways."
        },
    )
    router_smoothing_start: Literal["token", "old"] = field(
        default="token",
        metadata={
            "help": "Learned route with router_smoothing > 0: 'token' (s_0 = l_0) or 'old' (the average starts from the "
            "median logit of the old side's tokens, s_-1 = c: a sequence counts as old text until its tokens say "
            "otherwise)."
        },
    )
    router_preservation_copy: bool = field(
        default=False,
        metadata={
            "help": "Learned route, inference: carry the base model's stream beside the adapted one above "
            "preserve_layers, so tokens routed to the base model get its exact logits in mixed sequences too."
        },
    )
    router_gate: str = field(
        default="hard",
        metadata={
            "help": "Learned route: 'hard' (a routed token gets all of the expansion) or 'soft' (in proportion to how "
            "far the router's score clears its threshold: (p - tau) / (1 - tau))."
        },
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
        for name in ("ffn_expansion", "hidden_expansion", "preserve_layers", "router_hidden"):
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
        smoothing = self.router_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ValueError(
                f"ScaleConfig(router_smoothing={smoothing!r}): the moving average's coefficient a must be a number in "
                "[0, 1) (s_t = a s_(t-1) + (1 - a) l_t; e.g. 0.8, measured best; 0 decides per token)."
            )
        self.router_smoothing = float(smoothing)
        if smoothing and not (self.variant == "route" and self.route_rule == "learned"):
            raise ValueError(
                f"ScaleConfig(router_smoothing={smoothing}) smooths the learned router's score, but this config has "
                f"variant={self.variant!r}, route_rule={self.route_rule!r}: use it with variant='route', "
                "route_rule='learned' (the default rule of 'route'), or leave router_smoothing=0."
            )
        fall = self.router_smoothing_fall
        if fall is not None:
            if isinstance(fall, bool) or not isinstance(fall, (int, float)) or not 0 <= fall < 1:
                raise ValueError(
                    f"ScaleConfig(router_smoothing_fall={fall!r}): the average's coefficient while it falls must be a "
                    "number in [0, 1) (e.g. 0.4: it falls towards the base model faster than it rises), or None "
                    "(router_smoothing both ways)."
                )
            if not self.router_smoothing:
                raise ValueError(
                    f"ScaleConfig(router_smoothing_fall={fall}) sets how fast the router's moving average falls, but "
                    "router_smoothing is 0 (no average): set router_smoothing, e.g. 0.8, or leave router_smoothing_fall."
                )
            self.router_smoothing_fall = float(fall)
        if self.router_smoothing_start not in ("token", "old"):
            raise ValueError(
                f"ScaleConfig(router_smoothing_start={self.router_smoothing_start!r}): choose 'token' (the average "
                "starts at the first token's own logit) or 'old' (from the old side's median logit, set by fit_router)."
            )
        if self.router_smoothing_start == "old" and not self.router_smoothing:
            raise ValueError(
                "ScaleConfig(router_smoothing_start='old') sets where the router's moving average starts, but "
                "router_smoothing is 0 (no average): set router_smoothing, e.g. 0.8, or leave router_smoothing_start."
            )
        if not isinstance(self.router_preservation_copy, bool):
            raise ValueError(
                f"ScaleConfig(router_preservation_copy={self.router_preservation_copy!r}): pass True or False."
            )
        if self.router_preservation_copy and not (self.variant == "route" and self.route_rule == "learned"):
            raise ValueError(
                "ScaleConfig(router_preservation_copy=True) carries the base model's stream for the tokens a learned "
                f"router sends to the base model, but this config has variant={self.variant!r}, "
                f"route_rule={self.route_rule!r}: use it with variant='route', route_rule='learned' (the cosine rule "
                "always carries its own copy), or leave router_preservation_copy=False."
            )
        if self.router_gate not in ROUTER_GATES:
            raise ValueError(
                f"ScaleConfig(router_gate={self.router_gate!r}): choose 'hard' (a token the router sends to the "
                "expansion gets all of it) or 'soft' (in proportion to how far its score clears the threshold)."
            )
        if self.router_gate == "soft" and not (self.variant == "route" and self.route_rule == "learned"):
            raise ValueError(
                "ScaleConfig(router_gate='soft') weighs the expansion by the learned router's score, but this config "
                f"has variant={self.variant!r}, route_rule={self.route_rule!r}: use it with variant='route', "
                "route_rule='learned', or leave router_gate='hard'."
            )
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


def _init_with_saved_defaults(self, *args, **kwargs):
    # A config read back from adapter_config.json carries `peft_type` (a user never passes it). SCALE-Route adapters
    # saved before the learned router existed have no `route_rule` and used the cosine rule: they keep it, so that
    # they load and behave exactly as they did. A new ScaleConfig(variant="route") gets the learned rule.
    if "peft_type" in kwargs and kwargs.get("variant") == "route" and "route_rule" not in kwargs:
        kwargs["route_rule"] = "cosine"
    _dataclass_init(self, *args, **kwargs)


ScaleConfig.__init__ = _init_with_saved_defaults
