"""The base model's own samples in the new data's format: the old side of
``fit_router(model, new_data, BaseModelSamples(in_new_data_format=True))``.

When what is new is a set of *facts* in a format the base model already handles (questions about new people, new
products in a known catalogue), the base model's free samples are the wrong old side: a model tuned to answer
questions may never write one (measured on the biographies: 0 of 600 samples went on to ``? Answer :``), so a
router fitted against them learns "this format" instead of "something the model does not know", and sends the
old task to the expansion. These samples keep the new data's format and let the base model fill in the content:

1. A token that occurs in at least ``format_share`` of the new sequences is a *format* token (template words,
   punctuation, ``<s>``/``</s>``); every other token is *content* (names, values: each occurs in few sequences).
2. Each sample copies one new sequence's format tokens, in order. At each content position the base model,
   conditioned on the sample so far, draws the token (temperature 1), among
   - at the first position of a content run: the tokens that start a content run after the same format token in
     the new data (the slot's type: after ``of`` a first name, after ``Answer :`` an answer's first word; measured:
     without this only 26% of the biography samples had a known person's name in the name slot, with it 64%);
   - inside a run: every content token;
   - inside the *last* content run (the answer, the completion), also the format token that ends it: the model
     ends the answer where it would (up to the longest last run of the new data). Earlier runs keep the length
     they have in the new sequence. Measured on the biographies: with every run at the template's length, an
     answer of another length was forced (``Answer : Economics Art``) and 12% of the kept draws were a known
     person's question with the model's answer; with the last run free, 20%, at 4x fewer draws for as many.
   The base model writes the entity it knows and then what it knows about it, e.g.
   ``<s> What is the birth city of Otto Ingram ? Answer : Omaha </s>`` for a person it was trained on.
3. Two kinds of draws are dropped: exact repeats (they add nothing; draws are cheap, so ``count`` draws give
   fewer distinct samples), and draws that repeat a new sequence up to its last content run: the base model then
   wrote back the new data's own content (a new person's name), which is new, not old.

The draws cycle over the new sequences (draw ``i`` follows new sequence ``i % n``). This is not for a new language
or domain: there the new data's content *is* what is new, and samples that copy its format tokens (a language's
function words) would be new text labelled old. Use the default free samples, or old data, there.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional

import torch
from torch import nn
from transformers import DynamicCache


def _sequence_counts(sequences: list[torch.Tensor]) -> Counter:
    """Token -> the number of ``sequences`` it occurs in."""
    counts = Counter()
    for ids in sequences:
        counts.update(set(ids.tolist()))
    return counts


def format_tokens(sequences: list[torch.Tensor], format_share: float, counts: Optional[Counter] = None) -> set[int]:
    """The tokens that occur in at least ``format_share`` of ``sequences`` (each counted once per sequence;
    ``counts``: ``_sequence_counts(sequences)`` when already computed)."""
    counts = _sequence_counts(sequences) if counts is None else counts
    return {token for token, count in counts.items() if count >= format_share * len(sequences)}


def format_split(sequences: list[torch.Tensor], format_share: float) -> dict:
    """How ``format_share`` splits the tokens of ``sequences``: the format tokens, the share of sequences the rarest
    of them occurs in, and the share the most frequent content token occurs in (``format_share`` lies between the
    two; where they are close, a name or value may be taken for format, or a template word for content)."""
    counts = _sequence_counts(sequences)
    formats = format_tokens(sequences, format_share, counts)
    shares = {token: count / len(sequences) for token, count in counts.items()}
    return {
        "format_tokens": len(formats),
        "rarest_format_share": min((shares[t] for t in formats), default=None),
        "commonest_content_share": max((share for t, share in shares.items() if t not in formats), default=None),
    }


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


def longest_last_run(sequences: list[torch.Tensor], formats: set[int]) -> int:
    """The most tokens in the last content run of any of ``sequences``: how long a drawn last run may grow."""
    longest = 0
    for ids in sequences:
        ids = ids.tolist()
        longest = max(longest, len(ids) - len(_prefix_before_last_run(ids, formats)) - len(_format_tail(ids, formats)))
    return longest


def _format_tail(ids: list[int], formats: set[int]) -> list[int]:
    """The format tokens ``ids`` ends with."""
    end = len(ids)
    while end > 0 and ids[end - 1] in formats:
        end -= 1
    return ids[end:]


class _TemplateWalk:
    """One draw's way through the format of the new sequence it follows (step 2 of the module docstring).

    ``at`` is the template position to produce next. A format token there is copied; a content position is drawn.
    The template's last content run (the answer, the completion: what a sequence ends with) is as long as the model
    makes it: the draw stays at the run's first position while the model writes content, and the run ends when the
    model writes the template's next format token (or has written ``max_run`` tokens: that token is then copied).
    Earlier runs keep the template's length (measured: a model trained on answers only does not end a question's
    name where the question goes on, and writes biography text into it).
    """

    def __init__(self, template: list[int], formats: set[int], max_run: int):
        self.template, self.formats, self.max_run = template, formats, max_run
        self.tokens = template[:1]
        self.at, self.run = 1, 0
        # the last content run's positions -> the index of the format token that ends it (None elsewhere)
        self.ends_run = [None] * len(template)
        end = len(template) - 1
        while end > 0 and template[end] in formats and template[end - 1] in formats:
            end -= 1
        if template[end] in formats:
            index = end - 1
            while index > 0 and template[index] not in formats:
                self.ends_run[index] = end
                index -= 1

    @property
    def done(self) -> bool:
        return self.at >= len(self.template)

    def forced(self):
        """The next token when it is not the model's to choose (a format token), else ``None``."""
        token = self.template[self.at]
        if token in self.formats:
            return token
        end = self.ends_run[self.at]
        return self.template[end] if end is not None and self.run >= self.max_run else None

    def allowed(self, content: torch.Tensor, slot_masks: dict) -> torch.Tensor:
        """The tokens the model may draw next: a slot's type at a run's start, else content or the run's end."""
        last = self.tokens[-1]
        if self.run == 0 and last in self.formats:
            return slot_masks[last]
        end = self.ends_run[self.at]
        if self.run == 0 or end is None:
            return content
        mask = content.clone()
        mask[self.template[end]] = True
        return mask

    def advance(self, token: int) -> None:
        self.tokens.append(token)
        end = self.ends_run[self.at]
        if token in self.formats:  # the template's format token here, or the one that ends the current run
            self.at = self.at + 1 if end is None else end + 1
            self.run = 0
        else:
            self.run += 1
            if end is None:  # a run of the template's length
                self.at += 1


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

    Returns the kept samples (1-D token id tensors; the last content run is as long as the model makes it, up to
    the longest last run in the new data); raises a ``ValueError`` naming the fix when the new data has no content tokens or
    every draw was dropped.
    """
    from tqdm.auto import tqdm

    formats = format_tokens(new_sequences, format_share)
    if all(int(token) in formats for ids in new_sequences for token in ids):
        raise ValueError(
            f"fit_router(BaseModelSamples(in_new_data_format=True)): every token of the new data occurs in at least "
            f"format_share={format_share} of its sequences, so there is no content for the base model to fill in. "
            "Lower format_share, or draw free samples (in_new_data_format=False), or give old_data."
        )
    starts = slot_starts(new_sequences, formats)
    max_run = longest_last_run(new_sequences, formats)
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
        walks = [_TemplateWalk(new_sequences[i % len(new_sequences)].tolist(), formats, max_run)
                 for i in range(start, min(start + batch_size, num_samples))]
        cache = DynamicCache(config=model.config)  # filled in place: one new token per step
        while not all(walk.done for walk in walks):
            # a finished draw feeds its last token again: causal attention, so nothing earlier reads it
            last = torch.tensor([[walk.tokens[-1]] for walk in walks], device=device)
            logits = model(input_ids=last, cache=cache, use_cache=True).logits[:, -1]
            drawn = [r for r, walk in enumerate(walks) if not walk.done and walk.forced() is None]
            if drawn:
                allowed = torch.stack([walks[r].allowed(content, slot_masks) for r in drawn]).to(device)
                scores = logits[drawn].float().masked_fill(~allowed, float("-inf"))
                choice = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1).tolist()
            picks = dict(zip(drawn, choice)) if drawn else {}
            for r, walk in enumerate(walks):
                if not walk.done:
                    walk.advance(picks[r] if r in picks else walk.forced())
        for walk in walks:
            key = tuple(walk.tokens)
            if key in seen or _prefix_before_last_run(list(key), formats) in new_prefixes:
                continue
            seen.add(key)
            kept.append(torch.tensor(key))
    if len(kept) < 3:
        raise ValueError(
            f"fit_router(BaseModelSamples(in_new_data_format=True)): {len(kept)} of {num_samples} draws were kept (the "
            "others repeat an earlier draw, or a new sequence up to its last content run). Draw more "
            "(BaseModelSamples(count=...)), lower format_share "
            "(more content to fill in), or give old_data."
        )
    return kept
