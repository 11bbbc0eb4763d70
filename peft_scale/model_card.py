"""The SCALE part of the model card (``README.md``) that ``PeftModel.save_pretrained`` writes next to an adapter.

PEFT writes the card in ``PeftModel.create_or_update_model_card`` (library name, tags, base model, PEFT version)
and offers no per-method hook. ``install_model_card_hook`` wraps that method once per process: PEFT writes its
card as before, then, for a model with SCALE adapters, this module adds a section that says what the adapter is
(the method and its paper, the expansion sizes, the variant, the base model) and how to load it (``pip install
peft-scale``, ``import peft_scale``, ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM``). Without
peft-scale installed, PEFT cannot load a SCALE adapter at all (``KeyError: 'SCALE'``), so the card must say so.

The section sits between two HTML comments and is replaced, not appended, when the folder is saved again; the
rest of the card (PEFT's template or what a user wrote) is left as it is. ``model.push_to_hub(repo_id)`` publishes
the same card (transformers' version would replace it with a generic one): see ``_push_to_hub_with_scale_card``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from huggingface_hub import ModelCard
from peft import PeftModel

from .config import ScaleConfig
from .adapter_choice import outranked_adapters

PAPER_URL = "https://arxiv.org/abs/2511.03270"
PAPER_TITLE = "SCALE: Upscaled Continual Learning of Large Language Models"
CARD_TAGS = ("scale", "peft-scale", "width-expansion", "continual-pretraining", "arxiv:2511.03270")
SECTION_START = "<!-- peft-scale: start (written by peft_scale.model_card; replaced on every save) -->"
SECTION_END = "<!-- peft-scale: end -->"


def describe_adapter(config: ScaleConfig) -> dict[str, str]:
    """One row of the card's table: what the adapter does to the base model, in words and numbers."""
    shapes = config.base_ffn_shapes or []
    hidden = {shape[0] for shape in shapes}
    intermediate = {shape[1] for shape in shapes}
    if config.hidden_expansion:
        mode = "full width"
        hidden_text = f"{_one_or_list(hidden)} + {config.hidden_expansion}" if hidden else f"+{config.hidden_expansion}"
    else:
        mode = "FFN"
        hidden_text = "unchanged"
        if config.layers_to_transform is not None:
            layers = config.layers_to_transform
            mode += f" (layers {layers if isinstance(layers, int) else ', '.join(map(str, layers))})"
    ffn_text = f"{_one_or_list(intermediate)} + {config.ffn_expansion}" if intermediate else f"+{config.ffn_expansion}"
    if config.variant == "preserve":
        w12 = "none (W12 = 0 everywhere)"
    elif not config.hidden_expansion:
        w12 = f"FFN, layers {config.preserve_layers} and up"
    else:
        w12 = f"{config.adapt_modules}, layers {config.preserve_layers} and up"
    variant = config.variant
    if config.variant == "route" and config.route_rule == "cosine":
        variant += f" (cosine rule, tau = {config.route_threshold})"
    elif config.variant == "route":
        variant += f" (learned router on the input of layer {config.preserve_layers}"
        report = config.router_report
        if report:
            variant += (
                f"; held out: {report['old_to_base']:.1%} of old tokens to the base model, "
                f"{report['new_to_expansion']:.1%} of new tokens to the expansion; old side: {report['old_source']}"
            )
            if report.get("calibrate_on") == "fitted":  # (reports saved before calibrate_on existed: held out)
                variant += "; threshold set on all of the old data given"
            elif report.get("calibrate_on") == "cross_fitted":
                variant += "; threshold set on every old sequence, scored by routers that did not see it"
        else:
            variant += "; not fitted yet: call peft_scale.fit_router"
        if config.router.gate == "soft":
            variant += "; soft gate: the expansion weighed by how far the router's score clears its threshold"
        if config.router.preservation_copy:
            variant += "; preservation copy in inference: base-routed tokens exact in mixed sequences too"
        variant += ")"
    return {
        "mode": mode,
        "hidden size": hidden_text,
        "FFN size": ffn_text,
        "FFN projections": ffn_choice(config),
        "variant": variant,
        "trained W12": w12,
        "init": config.init,
    }


def ffn_choice(config: ScaleConfig) -> str:
    """Which projections SCALE widens as the FFN, and where that came from (the table, the shape, or the user)."""
    if config.hidden_expansion:
        return "every projection (full width)"
    outputs = set(config.ffn_output_modules or [])
    inputs = sorted(set(config.target_modules or []) - outputs)
    source = {"table": "from the family's table", "shape": "found by shape"}.get(config.ffn_found_by, "named by the user")
    return f"{', '.join(inputs)} -> {', '.join(sorted(outputs))} ({source})"


def _one_or_list(values: set[int]) -> str:
    return str(next(iter(values))) if len(values) == 1 else str(sorted(values))


def scale_section(configs: dict[str, ScaleConfig], adapter_id: str) -> str:
    """The card's SCALE section (Markdown) for the SCALE adapters ``configs`` (adapter name -> config)."""
    names = list(configs)
    base_models = {config.base_model_name_or_path for config in configs.values() if config.base_model_name_or_path}
    base_model = next(iter(base_models)) if len(base_models) == 1 else None
    base_id = base_model or "BASE_MODEL"  # the user replaces it when the base model's name was not recorded

    columns = list(describe_adapter(configs[names[0]]))
    table = [
        "| adapter | folder | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for name in names:
        row = describe_adapter(configs[name])
        folder = "." if name == "default" else name  # PEFT saves other adapters in a subfolder of that name
        table.append(f"| `{name}` | `{folder}` | " + " | ".join(row[column] for column in columns) + " |")

    causal_lm = any(str(getattr(config, "task_type", "") or "").endswith("CAUSAL_LM") for config in configs.values())
    # PEFT saves the adapter "default" in the folder itself and every other one in a subfolder of its name
    first = "default" if "default" in names else names[0]
    where = "" if first == "default" else f', subfolder="{first}", adapter_name="{first}"'
    load = [
        "```python",
        "import peft_scale  # registers the SCALE method with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_id}"{where})  # a Hub repo id or this folder',
    ]
    load += [
        f'model.load_adapter("{adapter_id}", subfolder="{name}", adapter_name="{name}")' for name in names if name != first
    ]
    routed = [name for name in names if configs[name].variant == "route" and configs[name].route_rule == "learned"]
    if len(routed) > 1:
        load.append(f"model.base_model.set_adapter({routed})  # routed together: each token to one domain's adapter")
    if causal_lm:
        load += [
            "",
            "# or in one call (loads the base model named in adapter_config.json):",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_id}"{where})',
        ]
    if any(not config.hidden_expansion and config.variant != "route" for config in configs.values()):
        load += ["", "dense = model.merge_and_unload()  # FFN mode: a plain model with the wider intermediate size"]
    load.append("```")

    lines = [
        SECTION_START,
        "## SCALE adapter",
        "",
        f"A [SCALE]({PAPER_URL}) adapter (Lee et al., *{PAPER_TITLE}*, arXiv 2511.03270), made with "
        "[peft-scale](https://pypi.org/project/peft-scale/): the base model's linear layers are widened with new "
        "blocks `[[W, W12], [W21, W22]]` around the frozen pre-trained `W`; only the new blocks are trained and "
        "stored here, and with the adapter disabled the model is the base model exactly.",
        "",
        f"- **Base model:** {f'`{base_model}`' if base_model else 'not recorded (the model it was trained on)'}",
        "- **Method:** SCALE (`peft_type: SCALE`), loaded through PEFT once `peft_scale` is imported",
        "",
        *table,
        "",
        *_routed_together(configs, routed),
        "### How to use",
        "",
        "```bash",
        "pip install peft-scale",
        "```",
        "",
        *load,
        "",
        "Without peft-scale installed, PEFT cannot load this adapter (`KeyError: 'SCALE'`).",
        SECTION_END,
    ]
    return "\n".join(lines)


def _routed_together(configs: dict[str, ScaleConfig], routed: list[str]) -> list[str]:
    """The card's paragraph on several learned-route adapters: one per domain, routed together."""
    if len(routed) < 2:
        return []
    accuracy = []
    for name in routed:
        report = configs[name].router_report
        outranks = [other for other in outranked_adapters(configs[name]) if other in routed]
        accuracy.append(
            f"`{name}`: {report['new_to_expansion']:.1%} of its domain's held-out tokens claimed, "
            f"{report['old_to_base']:.1%} of its old side's left to the base model"
            + (f", outranks {', '.join(f'`{other}`' for other in outranks)}" if outranks else "")
            if report
            else f"`{name}`: not fitted yet"
        )
    return [
        f"**One adapter per domain, routed together:** {', '.join(f'`{name}`' for name in routed)}. Activated together "
        f"(`model.base_model.set_adapter({routed})`), each token goes to the adapter whose learned router scores "
        "highest among those at or above their own threshold (a router fitted with another adapter's domain among its "
        "`other_domains` outranks that adapter's: a token both claim goes to it), and to the base model, exactly, when "
        "none claims it; a "
        "token sent to one adapter gets exactly what that adapter alone computes. Routers' held-out accuracy ("
        + "; ".join(accuracy)
        + "). `peft_scale.routing_confusion(model, {domain: token_ids, ...})` measures the share of each domain's "
        "tokens that goes to each adapter.",
        "",
    ]


def write_scale_section(card_path: str, configs: dict[str, ScaleConfig], adapter_id: str) -> None:
    """Add (or replace) the SCALE section and tags of the model card at ``card_path``, which must exist."""
    card = ModelCard.load(card_path)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in CARD_TAGS if tag not in tags]
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + scale_section(configs, adapter_id) + after
    else:
        # After the card's title line, so that the first thing a reader sees is what the adapter is.
        head, newline, tail = text.lstrip("\n").partition("\n")
        if head.startswith("# "):
            text = head + "\n\n" + scale_section(configs, adapter_id) + "\n" + newline + tail
        else:
            text = scale_section(configs, adapter_id) + "\n\n" + text
    card.text = text
    card.save(card_path)


def scale_configs(model) -> dict[str, ScaleConfig]:
    return {name: config for name, config in model.peft_config.items() if isinstance(config, ScaleConfig)}


def install_model_card_hook() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` and ``PeftModel.push_to_hub`` (once per process) so that the
    card of a folder and of a Hub repository has the SCALE section."""
    peft_method = PeftModel.create_or_update_model_card
    if getattr(peft_method, "_adds_scale_section", False):
        return

    @functools.wraps(peft_method)
    def create_or_update_model_card(self, output_dir: str, adapter_id: Optional[str] = None):
        peft_method(self, output_dir)
        configs = scale_configs(self)
        if configs:
            adapter_id = adapter_id or os.path.basename(os.path.abspath(output_dir))
            write_scale_section(os.path.join(output_dir, "README.md"), configs, adapter_id)

    create_or_update_model_card._adds_scale_section = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.print_trainable_parameters = _print_with_ffn_choice(PeftModel.print_trainable_parameters)
    PeftModel.push_to_hub = _push_to_hub_with_scale_card(PeftModel.push_to_hub)


def _print_with_ffn_choice(print_trainable_parameters):
    """PEFT's line, then for each SCALE adapter in FFN mode the projections it widens and where they came from."""

    @functools.wraps(print_trainable_parameters)
    def print_with_ffn_choice(self):
        print_trainable_parameters(self)
        for name, config in scale_configs(self).items():
            if not config.hidden_expansion:
                print(f"SCALE adapter {name!r}: FFN projections {ffn_choice(config)}")

    return print_with_ffn_choice


def _push_to_hub_with_scale_card(push_to_hub):
    """transformers' ``push_to_hub`` (which ``PeftModel`` inherits) saves the model in a temporary folder, then
    overwrites the folder's ``README.md`` with the repository's card, or, for a new repository, with a generic
    transformers card, and uploads the folder (``_upload_modified_files``). For a model with SCALE adapters, the card
    is brought up to date just before that upload, as ``save_pretrained`` does it: PEFT's part (library, tags, base
    model) and the SCALE section, whose loading snippet names the repository. The rest of an existing card (what its
    author wrote there) and the tags passed to ``push_to_hub`` are kept."""

    @functools.wraps(push_to_hub)
    def push_with_scale_card(self, repo_id: str, *args, **kwargs):
        if not scale_configs(self):
            return push_to_hub(self, repo_id, *args, **kwargs)
        upload = self._upload_modified_files

        def upload_with_scale_card(working_dir, repo_id, *upload_args, **upload_kwargs):
            card_path = os.path.join(working_dir, "README.md")
            tags = list(ModelCard.load(card_path).data.tags or []) if os.path.exists(card_path) else []
            self.create_or_update_model_card(working_dir, adapter_id=repo_id)
            card = ModelCard.load(card_path)
            kept = list(card.data.tags or [])
            card.data.tags = kept + [tag for tag in tags if tag not in kept]  # PEFT's update replaces the tag list
            card.save(card_path)
            return upload(working_dir, repo_id, *upload_args, **upload_kwargs)

        self.__dict__["_upload_modified_files"] = upload_with_scale_card  # this call only: shadows the method
        try:
            return push_to_hub(self, repo_id, *args, **kwargs)
        finally:
            self.__dict__.pop("_upload_modified_files", None)

    return push_with_scale_card
