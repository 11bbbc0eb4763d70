"""The base model's own samples in the new data's format: the old side of ``fit_router(sample_format="new_data")``.

When what is new is a set of *facts* in a format the base model already handles (questions about new people, new
products in a known catalogue), the base model's free samples are the wrong old side: a model tuned to answer
questions may never write one (measured on the biographies: 0 of 600 samples went on to ``? Answer :``), so a
router fitted against them learns "this format" instead of "something the model does not know", and sends the
old task to the expansion. These samples keep the new data's format and let the base model fill in the content:

1. A token that occurs in at least ``format_share`` of the new sequences is a *format* token (template words,
   punctuation, ``<s>``/``</s>``); every other token is *content* (names, values: each occurs in few sequences).
2. Each sample copies one new sequence's format tokens at their positions. At each content position the base
   model, conditioned on the sample so far, draws the token (temperature 1), among
   - at the first position of a content run: the tokens that start a content run after the same format token in
     the new data (the slot's type: after ``of`` a first name, after ``Answer :`` an answer's first word; measured:
     without this only 26% of the biography samples had a known person's name in the name slot, with it 64%);
   - inside a run: every content token.
   The base model writes the entity it knows and then what it knows about it, e.g.
   ``<s> What is the birth city of Otto Ingram ? Answer : Omaha </s>`` for a person it was trained on.
3. Two kinds of draws are dropped: exact repeats (they add nothing; draws are cheap, so ``num_samples`` draws give
   fewer distinct samples), and draws that repeat a new sequence up to its last content run: the base model then
   wrote back the new data's own content (a new person's name), which is new, not old.

The draws cycle over the new sequences (draw ``i`` follows new sequence ``i % n``). This is not for a new language
or domain: there the new data's content *is* what is new, and samples that copy its format tokens (a language's
function words) would be new text labelled old. Use the default free samples, or old data, there.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import nn
from transformers import DynamicCache


def format_tokens(sequences: list[torch.Tensor], format_share: float) -> set[int]:
    """The tokens that occur in at least ``format_share`` of ``sequences`` (each counted once per sequence)."""
    counts = Counter()
    for ids in sequences:
        counts.update(set(ids.tolist()))
    return {token for token, count in counts.items() if count >= format_share * len(sequences)}


def slot_starts(sequences: list[torch.Tensor], formats: set[int]) -> dict[int, list[int]]:
    """Format token -> the content tokens that follow it in ``sequences`` (the first token of a content run)."""
    follow = defaultdict(set)
    for ids in sequences:
        ids = ids.tolist()
        for t in range(1, len(ids)):
            if ids[t] not in formats and ids[t - 1] in formats:
                follow[ids[t - 1]].add(ids[t])
    return {token: sorted(tokens) for token, tokens in follow.items()}


def _prefix_before_last_run(ids: list[int], formats: set[int]) -> tuple[int, ...]:
    """``ids`` up to (not including) its last content run; all of it when it has no content."""
    end = len(ids)
    while end > 0 and ids[end - 1] in formats:
        end -= 1
    while end > 0 and ids[end - 1] not in formats:
        end -= 1
    return tuple(ids[:end])


@torch.no_grad()
def sample_in_format(
    model: nn.Module,
    new_sequences: list[torch.Tensor],
    num_samples: int,
    format_share: float,
    batch_size: int,
    seed: int,
    progress: bool,
) -> list[torch.Tensor]:
    """Up to ``num_samples`` distinct samples of ``model`` in the format of ``new_sequences`` (module docstring).

    Returns the kept samples (1-D token id tensors, each as long as the new sequence it follows); raises a
    ``ValueError`` naming the fix when the new data has no content tokens or every draw was dropped.
    """
    from tqdm.auto import tqdm

    formats = format_tokens(new_sequences, format_share)
    if all(int(token) in formats for ids in new_sequences for token in ids):
        raise ValueError(
            f"fit_router(sample_format='new_data'): every token of the new data occurs in at least "
            f"format_share={format_share} of its sequences, so there is no content for the base model to fill in. "
            "Lower format_share, or use sample_format='free' or old_data."
        )
    starts = slot_starts(new_sequences, formats)
    vocab_size = model.get_output_embeddings().weight.shape[0]  # the logits' width
    special = {getattr(model.config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    content = torch.ones(vocab_size, dtype=torch.bool)
    content[[t for t in formats | {s for s in special if isinstance(s, int)} if t < vocab_size]] = False
    slot_masks = {}
    for token, tokens in starts.items():
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[tokens] = True
        slot_masks[token] = mask
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    new_prefixes = {_prefix_before_last_run(ids.tolist(), formats) for ids in new_sequences}
    kept, seen = [], set()
    for start in tqdm(range(0, num_samples, batch_size), desc="Sampling the base model", disable=not progress):
        rows = [new_sequences[i % len(new_sequences)] for i in range(start, min(start + batch_size, num_samples))]
        lengths = [len(ids) for ids in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for row, seq in enumerate(rows):  # right padding: a row's positions past its length are never read
            ids[row, : len(seq)] = seq
        ids = ids.to(device)
        is_content = torch.tensor([[int(t) not in formats for t in row] for row in ids.tolist()], device=device)
        cache = DynamicCache(config=model.config)  # filled in place: one new token per step
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t - 1 : t], cache=cache, use_cache=True)
            rows_here = [r for r in range(len(rows)) if t < lengths[r] and is_content[r, t]]
            if not rows_here:
                continue
            allowed = torch.stack([
                slot_masks[int(ids[r, t - 1])] if not is_content[r, t - 1] else content for r in rows_here
            ]).to(device)
            logits = out.logits[rows_here, -1].float().masked_fill(~allowed, float("-inf"))
            ids[rows_here, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        for row, length in enumerate(lengths):
            sample = ids[row, :length].cpu()
            key = tuple(sample.tolist())
            if key in seen or _prefix_before_last_run(list(key), formats) in new_prefixes:
                continue
            seen.add(key)
            kept.append(sample)
    if len(kept) < 3:
        raise ValueError(
            f"fit_router(sample_format='new_data'): {len(kept)} of {num_samples} draws were kept (the others repeat an "
            "earlier draw, or a new sequence up to its last content run). Draw more (num_samples), lower format_share "
            "(more content to fill in), or give old_data."
        )
    return kept
