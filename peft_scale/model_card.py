"""The SCALE part of the model card (``README.md``) that ``PeftModel.save_pretrained`` writes next to an adapter.

PEFT writes the card in ``PeftModel.create_or_update_model_card`` (library name, tags, base model, PEFT version)
and offers no per-method hook. ``install_model_card_hook`` wraps that method once per process: PEFT writes its
card as before, then, for a model with SCALE adapters, this module adds a section that says what the adapter is
(the method and its paper, the expansion sizes, the variant, the base model) and how to load it (``pip install
peft-scale``, ``import peft_scale``, ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM``). Without
peft-scale installed, PEFT cannot load a SCALE adapter at all (``KeyError: 'SCALE'``), so the card must say so.

The section sits between two HTML comments and is replaced, not appended, when the folder is saved again; the
rest of the card (PEFT's template or what a user wrote) is left as it is.
"""

from __future__ import annotations

import functools
import os

from huggingface_hub import ModelCard
from peft import PeftModel

from .config import ScaleConfig

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
        else:
            variant += "; not fitted yet: call peft_scale.fit_router"
        variant += ")"
    return {
        "mode": mode,
        "hidden size": hidden_text,
        "FFN size": ffn_text,
        "variant": variant,
        "trained W12": w12,
        "init": config.init,
    }


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
    load = [
        "```python",
        "import peft_scale  # registers the SCALE method with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_id}")  # a Hub repo id or this folder',
    ]
    if causal_lm:
        load += [
            "",
            "# or in one call (loads the base model named in adapter_config.json):",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_id}")',
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


def install_model_card_hook() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` (once per process) to add the SCALE section."""
    peft_method = PeftModel.create_or_update_model_card
    if getattr(peft_method, "_adds_scale_section", False):
        return

    @functools.wraps(peft_method)
    def create_or_update_model_card(self, output_dir: str):
        peft_method(self, output_dir)
        configs = {name: config for name, config in self.peft_config.items() if isinstance(config, ScaleConfig)}
        if configs:
            adapter_id = os.path.basename(os.path.abspath(output_dir))
            write_scale_section(os.path.join(output_dir, "README.md"), configs, adapter_id)

    create_or_update_model_card._adds_scale_section = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
