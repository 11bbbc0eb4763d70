"""Text for causal-LM training, shared by the examples: documents from text files, held-out splits, packing into
fixed-length token blocks, and replay (mixing a fraction of old-domain blocks into the new-domain ones).

Replay (Abbes et al., arXiv 2508.01908: a small fraction of old data stabilises continual pre-training) needs no
mixer of its own: ``datasets.interleave_datasets`` draws every example from the new source with probability
``1 - f`` and from the old one with probability ``f``, seeded. ``replay_mix`` only checks the fraction and picks
the stopping rule.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, interleave_datasets

# Plain text between documents rather than the tokenizer's EOS, which for the bundled chat model is the end-of-turn
# token <|im_end|>: the base model predicts it badly after an article, and learning that from the new text would
# lower the old text's perplexity for a reason that has nothing to do with either domain.
DOCUMENT_SEPARATOR = "\n\n"
SAMPLE_BY = ("line", "paragraph", "document")


def read_documents(files: list[str | Path], sample_by: str = "paragraph") -> list[str]:
    """The documents in ``files`` (UTF-8 text), in file order: one per non-empty line, per paragraph (blocks of
    text between blank lines) or per file, as ``datasets``' ``text`` loader's ``sample_by`` does."""
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by={sample_by!r}: choose one of {SAMPLE_BY}.")
    documents = []
    for file in files:
        text = Path(file).read_text(encoding="utf-8")
        if sample_by == "line":
            parts = text.splitlines()
        elif sample_by == "paragraph":
            parts = text.replace("\r\n", "\n").split("\n\n")
        else:
            parts = [text]
        documents += [part.strip() for part in parts if part.strip()]
    if not documents:
        raise ValueError(
            f"No text in {[str(file) for file in files]}: give UTF-8 text files with at least one non-blank line."
        )
    return documents


def split_texts(texts: list[str], held_out: int, train: int, seed: int) -> tuple[list[str], list[str]]:
    """(held-out texts, training texts): disjoint, drawn from one seeded shuffle."""
    if held_out + train > len(texts):
        raise ValueError(f"Asked for {held_out} held-out + {train} training texts, but only {len(texts)} exist.")
    shuffled = random.Random(seed).sample(texts, len(texts))
    return shuffled[:held_out], shuffled[held_out : held_out + train]


def packed_blocks(texts: list[str], tokenizer, seq_len: int) -> Dataset:
    """Texts tokenized, joined by ``DOCUMENT_SEPARATOR`` and cut into blocks of ``seq_len`` tokens (tail dropped)."""
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [text_ids + separator for text_ids in ids]}

    def group_texts(batch):
        stream = [token for text_ids in batch["input_ids"] for token in text_ids]
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    dataset = Dataset.from_dict({"text": texts})
    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"])
    # batched over the whole list so that no block boundary falls at a map-batch edge
    return dataset.map(group_texts, batched=True, batch_size=len(texts))


def first_blocks(dataset: Dataset, count: int, language: str) -> Dataset:
    if len(dataset) < count:
        raise ValueError(f"The held-out {language} text fills only {len(dataset)} blocks, fewer than {count}.")
    return dataset.select(range(count))


def replay_mix(new: Dataset, old: Dataset, replay_fraction: float, seed: int) -> Dataset:
    """``new`` with about ``replay_fraction`` of the examples drawn from ``old`` instead, in a seeded random order.

    This is ``datasets.interleave_datasets([new, old], probabilities=[1 - f, f], seed=seed,
    stopping_strategy="first_exhausted")``: each example comes from ``old`` with probability ``f``, and the mix
    ends when either source runs out. Give ``old`` at least ``f / (1 - f)`` times as many examples as ``new`` (with
    some margin), or the mix ends before the new data does. ``replay_fraction=0`` returns ``new`` as it is.
    """
    if not 0 <= replay_fraction < 1:
        raise ValueError(f"replay_fraction={replay_fraction}: use 0 <= fraction < 1 (the share of old examples).")
    if replay_fraction == 0:
        return new
    return interleave_datasets(
        [new, old], probabilities=[1 - replay_fraction, replay_fraction], seed=seed, stopping_strategy="first_exhausted"
    )
