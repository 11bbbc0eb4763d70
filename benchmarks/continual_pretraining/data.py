"""The text of the experiment: new-language training text, held-out evaluation text of both languages, and the
old-language training text that the replay variants mix in and the learned router reads as its old side.

Documents are split into held-out and training sets by one seeded shuffle, tokenized, joined by a blank line and
packed into blocks of ``seq_len`` tokens, exactly as the demo does (``split_texts`` and ``packed_blocks``
from ``examples/text_blocks.py``, which the demo uses too, are reused, not copied). Every method of a run sees the same blocks
in the same order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset, concatenate_datasets

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
from bundled import documents_or_summaries  # noqa: E402,F401  (the experiment's documents, for run.py)
from text_blocks import packed_blocks, split_texts  # noqa: E402

from benchmarks.methods import mix_with_replay  # noqa: E402


def repeat_to(blocks: Dataset, count: int) -> Dataset:
    """The first ``count`` rows of ``blocks``, cycling through it again (another epoch) if it is shorter."""
    if len(blocks) == 0:
        raise ValueError("No complete block of text: give more text or a shorter --seq-len.")
    epochs = -(-count // len(blocks))  # ceil
    if epochs > 1:
        blocks = concatenate_datasets([blocks] * epochs)
    return blocks.select(range(count))


def as_tensor(blocks: Dataset) -> torch.Tensor:
    """``(rows, seq_len)`` token ids of a packed dataset."""
    return torch.tensor(blocks["input_ids"], dtype=torch.long)


def as_blocks(ids: torch.Tensor) -> Dataset:
    """``(rows, seq_len)`` token ids as a packed dataset (the columns of ``packed_blocks``)."""
    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": [list(row) for row in rows]})


def replay_stream(new_blocks: Dataset, old_blocks: Dataset, replay_fraction: float, seed: int, train_blocks: int) -> torch.Tensor:
    """``train_blocks`` rows of ``new_blocks`` with a ``replay_fraction`` share of ``old_blocks`` mixed in
    (``benchmarks.methods.mix_with_replay``); both sources are cycled to the full length first, so the mix never
    runs short. The positions of the old rows depend only on ``seed``, ``replay_fraction`` and ``train_blocks``:
    two old sources (old data, the base model's samples) are replayed at the same steps, each from its first row on."""
    mixed = mix_with_replay(repeat_to(new_blocks, train_blocks), repeat_to(old_blocks, train_blocks), replay_fraction, seed)
    replay = as_tensor(mixed.select(range(min(train_blocks, len(mixed)))))
    if len(replay) < train_blocks:
        replay = as_tensor(repeat_to(mixed, train_blocks))
    return replay


def replayed_rows(replay_fraction: float, seed: int, train_blocks: int) -> int:
    """How many old-side rows ``replay_stream`` takes (the first ones of the old source), from the mix's seeded
    order alone."""
    source = Dataset.from_dict({"old": [False] * train_blocks})
    mixed = mix_with_replay(source, Dataset.from_dict({"old": [True] * train_blocks}), replay_fraction, seed)
    return sum(mixed.select(range(min(train_blocks, len(mixed))))["old"])


@dataclass
class ExperimentText:
    """Token blocks of one run, all ``(rows, seq_len)`` long tensors on the CPU.

    Attributes:
        new_train: the new-language training stream, ``steps * batch_size`` rows, in training order.
        replay_train: the same number of rows with a ``replay_fraction`` share of old-language blocks mixed in
            (``benchmarks.methods.mix_with_replay``, i.e. ``datasets.interleave_datasets``); ``None`` without replay.
        old_train: the first ``old_train_blocks`` packed blocks of the old-language *training* documents (the ones
            replay draws from, in the same order; never the held-out ones), e.g. the learned router's old side;
            ``None`` when none were asked for.
        new_blocks: every packed block of the new-language training documents (a ``Dataset``, for other replay
            mixes: ``replay_stream``).
        new_eval / old_eval: held-out blocks of each language (never trained on).
        epochs: how many times the new-language training text was cycled to fill the steps (1 = no repeats).
        switch_eval: text that switches language: each row is the first half of a ``new_eval`` block followed by
            the second half of the ``old_eval`` block of the same row (two documents), ``switch_at`` its first
            old-language position.
    """

    new_train: torch.Tensor
    replay_train: Optional[torch.Tensor]
    new_eval: torch.Tensor
    old_eval: torch.Tensor
    epochs: float
    old_train: Optional[torch.Tensor] = None
    new_blocks: Optional[Dataset] = None

    @property
    def switch_at(self) -> int:
        return self.new_eval.shape[1] // 2

    @property
    def switch_eval(self) -> torch.Tensor:
        return torch.cat([self.new_eval[:, : self.switch_at], self.old_eval[:, self.switch_at :]], dim=1)


def build_text(
    tokenizer,
    *,
    new_documents: list[str],
    old_documents: list[str],
    held_out_documents: int,
    eval_blocks: int,
    train_blocks: int,
    seq_len: int,
    replay_fraction: float,
    seed: int,
    old_train_blocks: int = 0,
) -> ExperimentText:
    """Split, tokenize and pack both languages; see ``ExperimentText``.

    ``held_out_documents`` of each language are set aside before anything is trained on; the first ``eval_blocks``
    packed blocks of them are the evaluation set.
    """
    for name, documents in (("new", new_documents), ("old", old_documents)):
        if len(documents) <= held_out_documents:
            raise ValueError(
                f"The {name}-language text has {len(documents)} documents, not more than the {held_out_documents} held "
                "out for evaluation: give more text or a smaller --held-out-documents."
            )
    new_eval_docs, new_train_docs = split_texts(new_documents, held_out_documents, len(new_documents) - held_out_documents, seed)
    old_eval_docs, old_train_docs = split_texts(old_documents, held_out_documents, len(old_documents) - held_out_documents, seed)

    evaluation = {}
    for name, documents in (("new", new_eval_docs), ("old", old_eval_docs)):
        blocks = packed_blocks(documents, tokenizer, seq_len)
        if len(blocks) < eval_blocks:
            raise ValueError(
                f"The held-out {name}-language text fills only {len(blocks)} blocks of {seq_len} tokens, fewer than "
                f"--eval-blocks={eval_blocks}: hold out more documents or evaluate fewer blocks."
            )
        evaluation[name] = as_tensor(blocks.select(range(eval_blocks)))

    new_blocks = packed_blocks(new_train_docs, tokenizer, seq_len)
    replay = old_train = None
    if replay_fraction > 0 or old_train_blocks > 0:
        old_blocks = packed_blocks(old_train_docs, tokenizer, seq_len)
        if replay_fraction > 0:
            replay = replay_stream(new_blocks, old_blocks, replay_fraction, seed, train_blocks)
        if old_train_blocks > 0:
            old_train = as_tensor(repeat_to(old_blocks, old_train_blocks))
    return ExperimentText(
        new_train=as_tensor(repeat_to(new_blocks, train_blocks)),
        replay_train=replay,
        new_eval=evaluation["new"],
        old_eval=evaluation["old"],
        epochs=train_blocks / len(new_blocks),
        old_train=old_train,
        new_blocks=new_blocks,
    )
