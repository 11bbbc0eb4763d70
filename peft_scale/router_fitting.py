"""Fitting the learned router of a SCALE-Route adapter: ``fit_router`` and ``RouterFitCallback``.

The router (``peft_scale.token_router.TokenRouter``) reads the stream entering layer ``L = preserve_layers``, which is
the base model's own hidden state (nothing below ``L`` can change it). So it is fitted once, before the adapter
trains, on frozen features, and it never drifts while the adapter trains. ``fit_router``'s steps, each a function
below; every setting is the adapter's ``RouterConfig``:

1. The old side (``_old_side``): the user's old data, or the base model's own samples (``BaseModelSamples``;
   ``old_data=None``): what the base model produces is by definition what it already does. When the new data are
   windows cut from running text (they do not start with the samples' first prompt token, e.g. ``<s>``), each
   sample is cut the same way (``cut_like_new_data``), or the router learns "starts with ``<s>``" instead of "is old
   text". With samples, the report says how they differ from the new data beyond language (``sample_differences``).
2. The features (``_features``): every token of both sides through the base model (adapter disabled) up to layer
   ``L`` only (the forward pass stops there).
3. The routers (``_fit_trial_and_kept``): sequences (not tokens: neighbouring tokens are alike) are split into a
   fitting, a calibration and a held-out part; a trial router is trained on the fitting part with a class-balanced
   logistic loss. The router that is kept is refitted on every sequence of both sides, so that none of the new data
   is left to a router that never saw it (the adapter trains on all of it).
4. The threshold (``_threshold``), biased towards the base model: a wrong "expansion" on old text costs
   forgetting, a wrong "base model" on new text only a little learning. It is the lowest threshold (at least 0.5)
   at which at most ``max_old_error`` of the old tokens reach the expansion, those tokens scored as
   ``RouterConfig.calibrate_on`` says: ``"cross_fitted"``, every old sequence scored by one of ``CROSS_FIT_FOLDS``
   routers fitted on the other folds (a bound for old text the router has not seen, read off all the old tokens);
   ``"held_out"``, the trial router on the calibration part; ``"fitted"``, the kept router on all the old data
   (the old data *is* what must be kept: a set of facts, a regression set).
5. The report: on the held-out part, the share of old tokens routed to the base model and of new tokens routed to
   the expansion; the ``fitted_*`` shares are the kept router's on all the data.
6. With one routed adapter per domain, the other adapters' fitted routers that read the same layer score this
   side's held-out new tokens: the share each claims is the report's ``claimed_by_other_adapters``, and above
   ``CLAIMED_WARNING`` a warning says which router to refit.
7. ``other_domains`` (the text of the other routed adapters' domains) are negatives in the training, pooled with the
   old side, but not part of the calibration: the threshold bounds only what must be kept (forgetting). A domain
   named like another learned-route adapter of the model is that adapter's: this router *outranks* it
   (``RouterConfig.outranks``; ``adapter_choice.outranking``): routed together, a token both claim goes to this adapter,
   since only this router learned the difference, and the earlier adapter's router need not be refitted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .config import DEFAULT_MAX_OLD_ERROR
from .format_sampling import format_split, sample_in_format
from .smoothing import smooth_logits, smoothing_start
from .token_router import rms_normalise, router_stream

logger = logging.get_logger(__name__)

SPLIT = (0.6, 0.2, 0.2)  # fitting, calibration, held-out: shares of each side's sequences
FIRST_TOKENS = 8  # the report also gives the accuracy on each sequence's first tokens, which have little context
# above this share of an adapter's held-out new tokens claimed by another adapter's router, fit_router warns: routed
# together, one token in twenty could go to the wrong domain's adapter (the threshold itself lets 1% of old in)
CLAIMED_WARNING = 0.05
CROSS_FIT_FOLDS = 5  # RouterConfig(calibrate_on="cross_fitted"): routers fitted, each on four fifths of the sequences
# below this share of the held-out new tokens reaching the expansion (with old data given), fit_router warns: the
# adapter only learns where tokens reach it. A new language or domain sends nearly all of them; new facts in the old
# data's format send only the tokens that differ, and the threshold set on unseen old text can leave the answers out
LITTLE_NEW_WARNING = 0.5


@dataclass
class RouterReport:
    """What ``fit_router`` measured, on held-out sequences it neither fitted nor calibrated on.

    Attributes:
        adapter_name: the adapter whose router was fitted.
        layer: the decoder layer whose input the router reads (``preserve_layers``).
        old_source: ``"old data"``, ``"base model samples"`` or ``"base model samples in the new data's format"``
            (``BaseModelSamples(in_new_data_format=True)``).
        old_to_base: share of held-out old tokens routed to the base model.
        new_to_expansion: share of held-out new tokens routed to the expansion.
        threshold: the score at or above which a token goes to the expansion.
        first_tokens_old_to_base, first_tokens_new_to_expansion: the same on the first ``FIRST_TOKENS`` tokens of
            each held-out sequence: the router reads a contextualised stream, and the first tokens have little
            context (measured: most of the router's errors are there).
        calibration_old_to_base, calibration_new_to_expansion: the same on the calibration part (with
            ``calibrate_on="cross_fitted"`` the old share is on every old token, scored out of fold).
        fitted_old_to_base, fitted_new_to_expansion: the kept router (refitted on every sequence) on all the data:
            the share of ``new_data`` the adapter will train on at the expansion, and of the given old data kept
            on the base model.
        calibrate_on: ``"held_out"``, ``"cross_fitted"`` or ``"fitted"``: where the threshold was set
            (``RouterConfig.calibrate_on``).
        max_old_error: the share of those old tokens allowed to reach the expansion, which set the threshold.
        tokens: ``{"old": n, "new": n}``: tokens of each side the router saw (all parts).
        held_out_tokens: ``{"old": n, "new": n}`` in the held-out part.
        claimed_by_other_adapters: ``{adapter: share}`` for every other learned-route adapter of the model whose
            router is fitted and reads the same layer (so can be routed together with this one): the share of the
            held-out new tokens that its router claims (score at or above its own threshold), as it stood when this
            router was fitted. Routed together, such a token goes to whichever claiming router scores highest
            (unless one outranks the other: ``RouterConfig.outranks``), so it can miss this adapter; above ``CLAIMED_WARNING``
            ``fit_router`` warns. Empty when there is no such adapter. (The reverse, this router claiming another
            domain's tokens, is ``1 - old_to_base`` with that domain's text in ``old_data``.)
        other_to_expansion: ``{domain: share}`` for every domain given in ``other_domains``: the share of its held-out
            tokens that this router claims (score at or above the threshold, which was not calibrated on them).
            Routed together with that domain's adapter, this router takes such a token when it outranks that
            adapter's (``RouterConfig.outranks``), else the more confident one does; with this adapter active alone, it goes to
            this adapter. Empty without ``other_domains``.
        other_held_out_tokens: ``{domain: n}``: held-out tokens of each of ``other_domains``.
        calibration_tokens: the old tokens the threshold was set on (the calibration part's; with
            ``calibrate_on="cross_fitted"`` or ``"fitted"`` every old token); ``max_old_error`` of them may reach
            the expansion.
        format_split: with ``BaseModelSamples(in_new_data_format=True)``: ``format_share`` and the split it made
            (``format_sampling.format_split``: the format tokens, the share of new sequences the rarest of them is
            in, the share the most frequent content token is in) and the draws made and kept; else empty.
        sample_differences: with the base model's free samples as the old side, how they differ from the new data
            beyond language (``sample_differences``: lengths, shared vocabulary, the samples' own frequent tokens);
            else empty. Every share above is measured on the samples, not on the text to keep.
    """

    adapter_name: str
    layer: int
    old_source: str
    old_to_base: float
    new_to_expansion: float
    threshold: float
    first_tokens_old_to_base: float
    first_tokens_new_to_expansion: float
    calibration_old_to_base: float
    calibration_new_to_expansion: float
    fitted_old_to_base: float
    fitted_new_to_expansion: float
    calibrate_on: str
    max_old_error: float
    tokens: dict
    held_out_tokens: dict
    calibration_tokens: int
    claimed_by_other_adapters: dict = field(default_factory=dict)
    other_to_expansion: dict = field(default_factory=dict)
    other_held_out_tokens: dict = field(default_factory=dict)
    format_split: dict = field(default_factory=dict)
    sample_differences: dict = field(default_factory=dict)

    def __str__(self) -> str:
        claimed = ""
        if self.format_split:
            split = self.format_split
            shares = {key: "-" if split[key] is None else f"{split[key]:.1%}"  # None: no token of that kind
                      for key in ("rarest_format_share", "commonest_content_share")}
            claimed += (
                f"\n  format (format_share={split['format_share']}): {split['format_tokens']} tokens, the rarest in "
                f"{shares['rarest_format_share']} of the new sequences; the most frequent content token in "
                f"{shares['commonest_content_share']} (format_share belongs between: a name or value above it is "
                f"copied into the draws); {split['kept']:,} of {split['draws']:,} draws kept"
            )
        if self.other_to_expansion:
            shares = ", ".join(
                f"{name!r} {share:.2%} of {self.other_held_out_tokens[name]:,}"
                for name, share in self.other_to_expansion.items()
            )
            claimed += (
                f"\n  held-out tokens of the other domains routed to the expansion (negatives, not calibrated on): "
                f"{shares}"
            )
        if self.claimed_by_other_adapters:
            shares = ", ".join(
                f"{name!r} {share:.2%}" for name, share in self.claimed_by_other_adapters.items()
            )
            claimed += f"\n  held-out new tokens claimed by other adapters' routers: {shares}"
        if self.old_source.startswith("base model samples"):
            # measured on the biographies: samples unlike the old task (prose from a QA-tuned model) gave 99.3% here
            # while 43% of the old questions' answer positions reached the expansion
            claimed += (
                "\n  the old shares are measured on the base model's own samples, not on the old task's text: "
                "check what must be kept on text of it"
            )
        if self.sample_differences:
            differ = self.sample_differences
            only = ", ".join(f"{token!r} {share:.1%}" for token, share in differ["sample_only"]) or "none"
            claimed += (
                f"\n  the samples against the new data: median length {differ['median_length']['samples']} against "
                f"{differ['median_length']['new']} tokens; {differ['shared_vocabulary']:.1%} of the new tokens occur in "
                f"them; their most frequent tokens absent from the new data: {only}. Where the text to keep shares the "
                "new data's genre, give a few thousand tokens of it as old_data: the samples are the base model's genre"
            )
        return (
            f"SCALE router of adapter {self.adapter_name!r} (reads the input of layer {self.layer}; old side: "
            f"{self.old_source}; threshold {self.threshold:.3f}, max_old_error {self.max_old_error})\n"
            f"  held-out old tokens routed to the base model: {self.old_to_base:.2%} of {self.held_out_tokens['old']:,}\n"
            f"  held-out new tokens routed to the expansion:  {self.new_to_expansion:.2%} of "
            f"{self.held_out_tokens['new']:,}\n"
            f"  on the first {FIRST_TOKENS} tokens of each sequence: {self.first_tokens_old_to_base:.2%} (old), "
            f"{self.first_tokens_new_to_expansion:.2%} (new)\n"
            f"  the kept router (refitted on all sequences) on all of them: {self.fitted_old_to_base:.2%} of old "
            f"tokens to the base model, {self.fitted_new_to_expansion:.2%} of new tokens to the expansion "
            f"(threshold set on {self.calibration_tokens:,} {self.calibrate_on.replace('_', '-')} old tokens)"
            + claimed
        )


# --------------------------------------------------------------------------------------------------- the data

TokenData = Union[torch.Tensor, list, object]  # a LongTensor, a list of sequences or of dicts, a datasets.Dataset


def token_sequences(
    data,
    what: str,
    vocab_size: Optional[int],
    caller: str = "fit_router",
    if_empty: str = "The router needs examples of it to tell it apart.",
    tokenizer=None,
) -> list[torch.Tensor]:
    """``data`` as a list of 1-D ``LongTensor`` sequences (padding removed where an ``attention_mask`` says so):
    the one check of token-id inputs, for ``fit_router`` and ``routing_confusion``.

    Accepts an integer tensor ``(n, seq)``, a list of 1-D token id sequences (tensors or lists, of any lengths), a
    ``datasets.Dataset`` with an ``input_ids`` column, or a list of dicts with ``input_ids`` (lists or tensors,
    optionally ``attention_mask``), or, with ``tokenizer``, a list of strings (each tokenized as one sequence, with
    the tokenizer's special tokens). Sequences without tokens are dropped.

    Args:
        data: the token ids.
        what: how the caller's user names ``data`` in an error (``"new_data"``, ``"data['es']"``).
        vocab_size: the model's vocabulary size (token ids must lie in ``[0, vocab_size)``), or ``None``.
        caller: the public function whose input this is; every error message starts with it.
        if_empty: the sentence after "``what`` is empty (no tokens)." in that error.
        tokenizer: the model's tokenizer, for ``data`` given as strings.

    Raises:
        TypeError: ``data`` of an unsupported type.
        ValueError: a tensor that is not 2-D integers, items that are not token id sequences, a dataset without
            ``input_ids``, no tokens at all, or token ids outside the vocabulary.
    """
    fix = (
        f"Give {what} as a LongTensor of token ids of shape (n, seq), a list of 1-D token id sequences, a "
        "datasets.Dataset with an 'input_ids' column, or a list of dicts with 'input_ids'."
    )
    if tokenizer is not None and isinstance(data, (list, tuple)) and data and all(isinstance(row, str) for row in data):
        data = [tokenizer(text)["input_ids"] for text in data]
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
            raise ValueError(f"{caller}: {what} is a {data.dtype} tensor of shape {tuple(data.shape)}. {fix}")
        rows = list(data)
    elif hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        if "input_ids" not in data.column_names:
            raise ValueError(f"{caller}: {what} has columns {data.column_names}, no 'input_ids'. Tokenize it first.")
        rows = list(data.with_format("torch"))
    elif isinstance(data, (list, tuple)):
        if data and all(isinstance(row, str) for row in data):
            also = ", or pass the model's tokenizer (tokenizer=...)" if caller in ("fit_router", "forgetting") else ""
            raise ValueError(f"{caller}: {what} is a list of strings; tokenize it first{also}.")
        # an item is a dict with input_ids or a sequence of token ids (a str or a number is neither)
        if not all(
            (isinstance(row, dict) and "input_ids" in row)
            or (hasattr(row, "__len__") and not isinstance(row, (str, bytes, dict)))
            for row in data
        ):
            raise ValueError(
                f"{caller}: {what} is a list whose items are not dicts with 'input_ids' nor 1-D token id "
                f"sequences. {fix}"
            )
        rows = data
    else:
        raise TypeError(f"{caller}: {what} is a {type(data).__name__}. {fix}")
    sequences = []
    for row in rows:
        key = "input_ids" if isinstance(row, dict) else "token ids"
        ids = torch.as_tensor(row["input_ids"] if isinstance(row, dict) else row)
        if ids.dim() == 1 and not len(ids):  # (an empty list is a float tensor: no tokens, whatever its dtype)
            continue
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(
                f"{caller}: an item of {what} has {key} of dtype {ids.dtype}, shape {tuple(ids.shape)}. {fix}"
            )
        if isinstance(row, dict) and row.get("attention_mask") is not None:
            ids = ids[torch.as_tensor(row["attention_mask"]).bool()]
        if len(ids):
            sequences.append(ids.long())
    if not sequences:
        raise ValueError(f"{caller}: {what} is empty (no tokens). {if_empty}")
    largest = max(int(ids.max()) for ids in sequences)
    smallest = min(int(ids.min()) for ids in sequences)
    if vocab_size is not None and (largest >= vocab_size or smallest < 0):
        raise ValueError(
            f"{caller}: {what} holds token id {largest if largest >= vocab_size else smallest}, outside the model's "
            f"vocabulary of {vocab_size}: was it tokenized with this model's tokenizer?"
        )
    return sequences


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at layer ``L``: nothing above it is needed."""


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, features: int, sequences, batch_size: int) -> list[torch.Tensor]:
    """The original stream entering ``layer``, ``(len(ids), d)`` per sequence, through ``model`` (the base model:
    the caller disables the adapters)."""
    captured = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(router_stream(hidden, features).float())
        raise _Captured

    device = next(model.parameters()).device
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            length = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.long)
            for row, seq in enumerate(batch):  # right padding: positions of real tokens keep their indices
                ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Captured:
                pass
            hidden = captured[0].cpu()
            out.extend(hidden[row, : len(seq)] for row, seq in enumerate(batch))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def sample_base_model(
    model: nn.Module, prompts: torch.Tensor, num_samples: int, length: int, batch_size: int, seed: int, progress: bool
) -> list[torch.Tensor]:
    """``num_samples`` sequences of ``length`` tokens sampled from ``model`` (temperature 1, no truncation), each
    started from a row of ``prompts`` (cycled)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in tqdm(range(0, num_samples, batch_size), desc="Sampling the base model", disable=not progress):
            count = min(batch_size, num_samples - start)
            rows = torch.arange(start, start + count) % len(prompts)
            prompt = prompts[rows].to(device)
            new_tokens = max(length - prompt.shape[1], 1)
            generated = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # full-length samples: the end-of-text token is suppressed until then
                pad_token_id=int(prompt[0, 0]),
            )
            samples.extend(generated.cpu())
    return samples


def cut_like_new_data(samples: list, new_sequences: list, prompts: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """The base model's samples cut the way the new data is: unchanged when most new sequences start with a
    prompt's first token (e.g. ``<s>``), as the samples do; otherwise, windows of running text, each sample less a
    random number of its first tokens (1 to a quarter of it), read as a sequence of its own. A router fitted on
    samples that all start with ``<s>`` against windows that never do learns the start, not the text."""
    starts = {int(token) for token in prompts[:, 0]}
    if sum(int(ids[0]) in starts for ids in new_sequences) >= len(new_sequences) / 2:
        return samples
    generator = torch.Generator().manual_seed(seed)
    cut = []
    for ids in samples:
        drop = int(torch.randint(1, max(len(ids) // 4, 1) + 1, (1,), generator=generator))
        cut.append(ids[min(drop, len(ids) - 1) :])
    return cut


def default_prompts(model: nn.Module) -> torch.Tensor:
    """One prompt per sample: the beginning-of-text token, where the model has one."""
    bos = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        raise ValueError(
            "fit_router(old_data=None) samples the old side from the base model, starting each sample from the "
            "beginning-of-text token, but this model has no bos_token_id. Pass old_data=BaseModelSamples(prompts=...) "
            "(a LongTensor of shape (n, p) of prompt token ids), or old data."
        )
    return torch.tensor([[bos]])


# ---------------------------------------------------------------------------------------------------- fitting


def _split_sequences(count: int, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
    order = torch.randperm(count, generator=generator).tolist()
    n_cal = max(1, round(SPLIT[1] * count))
    n_test = max(1, round(SPLIT[2] * count))
    return order[n_cal + n_test :], order[:n_cal], order[n_cal : n_cal + n_test]


def _train_router(router, new: torch.Tensor, old: torch.Tensor, seed: int):
    """Class-balanced logistic regression of ``router``'s score on fitting features (full batch, Adam: ``ROUTER_*``)."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.cat([new, old])
    normalised = rms_normalise(pooled)
    params = {name: buffer.detach().clone() for name, buffer in router.named_buffers()}
    params["feature_mean"] = normalised.mean(0)
    params["feature_scale"] = normalised.std(0).clamp_min(1e-4)
    width, d = params["w_in"].shape
    bound = 1 / math.sqrt(d)
    params["w_in"] = (torch.rand(width, d, generator=generator) * 2 - 1) * bound
    params["b_in"] = (torch.rand(width, generator=generator) * 2 - 1) * bound
    params["w_out"] = (torch.rand(width, generator=generator) * 2 - 1) / math.sqrt(width)
    params["b_out"] = torch.zeros(1)
    trained = [params[name] for name in ("w_in", "b_in", "w_out", "b_out")]
    for tensor in trained:
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=ROUTER_LR)
    labels = torch.cat([torch.ones(len(new)), torch.zeros(len(old))])
    # each side weighs as much as the other, whatever their token counts
    weights = torch.cat([torch.full((len(new),), 0.5 / len(new)), torch.full((len(old),), 0.5 / len(old))])
    with torch.enable_grad():
        for _ in range(ROUTER_STEPS):
            optimizer.zero_grad(set_to_none=True)
            logits = router.logits(pooled, params)
            loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum()
            loss = loss + ROUTER_WEIGHT_DECAY * params["w_in"].pow(2).sum()
            loss.backward()
            optimizer.step()
    return {name: tensor.detach() for name, tensor in params.items()}


@dataclass(frozen=True)
class BaseModelSamples:
    """The router's old side drawn from the base model itself (self-synthesised rehearsal: what the base model
    produces is by definition what it already does): ``fit_router(model, new_data, BaseModelSamples(...))``;
    ``old_data=None`` is ``BaseModelSamples()``.

    Args:
        count: samples to draw (with ``in_new_data_format``: draws, of which repeats and copies of a new sequence's
            content are dropped).
        length: tokens per sample, prompt included (cut like the new data when it is windows of running text).
        prompts: a ``LongTensor`` ``(n, p)`` of prompt token ids, cycled over the samples; default the
            beginning-of-text token.
        in_new_data_format: draw each sample as a copy of a new sequence (cycled) whose format tokens are kept and
            whose content the base model fills in (``peft_scale.format_sampling``): for new facts in a format the
            model already handles (a question-answer template); not for a new language or domain, whose content is
            the new part. ``length`` and ``prompts`` do not apply.
        format_share: with ``in_new_data_format``, a token in at least this share of the new sequences is a format
            token (copied), the others content (filled in). Set it below the share of the template's words and
            above that of the most frequent name or value (the report's ``format_split`` shows both).
        batch_size: samples drawn per ``generate`` call (larger is faster where memory allows).
    """

    count: int = 64
    length: int = 128
    prompts: Optional[torch.Tensor] = None
    in_new_data_format: bool = False
    format_share: float = 0.05
    batch_size: int = 8

    def __post_init__(self):
        for name in ("count", "length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BaseModelSamples({name}={value!r}): a positive integer.")
        if self.prompts is not None:
            prompts = torch.as_tensor(self.prompts)
            if prompts.dim() != 2 or prompts.dtype.is_floating_point or not prompts.numel():
                raise ValueError(
                    f"BaseModelSamples(prompts=...): a LongTensor of prompt token ids of shape (n, prompt_length), "
                    f"got shape {tuple(prompts.shape)} of {prompts.dtype}."
                )
            if self.in_new_data_format:
                raise ValueError(
                    "BaseModelSamples(in_new_data_format=True, prompts=...): each draw copies a new sequence's format, "
                    "so prompts do not apply; drop them, or draw free samples (in_new_data_format=False)."
                )
            object.__setattr__(self, "prompts", prompts.long())
        if not 0 < self.format_share <= 1:
            raise ValueError(
                f"BaseModelSamples(format_share={self.format_share}): a share of the new sequences in (0, 1], e.g. 0.05."
            )


FEATURE_BATCH = 8  # sequences per forward pass of the base model up to the router's layer
# the router's own training (full batch, Adam): fixed, it fits in well under the steps on every benchmark
ROUTER_STEPS, ROUTER_LR, ROUTER_WEIGHT_DECAY = 300, 1e-2, 1e-4


def fit_router(
    model: nn.Module,
    new_data: TokenData,
    old_data: Union[TokenData, BaseModelSamples, None] = None,
    *,
    tokenizer=None,
    other_domains: Optional[dict] = None,
    adapter_name: Optional[str] = None,
    max_old_error: Optional[float] = None,
    progress: bool = True,
) -> RouterReport:
    """Fit the learned router of a SCALE-Route adapter to tell ``new_data``'s tokens from the old side's.

    The steps (module docstring): the old side; the features (the base model's stream entering layer
    ``preserve_layers``); the routers (a trial one on a fitting part, the kept one on everything); the threshold
    (at most ``max_old_error`` of the old side's tokens reach the expansion, measured as ``RouterConfig.calibrate_on``
    says); the report on held-out sequences. The adapter's ``RouterConfig`` (``config.router``) gives every setting.

    Args:
        model: a ``PeftModel`` (or ``ScaleModel``) with a learned-route adapter (``ScaleConfig(router=RouterConfig())``
            or ``variant="route"``).
        new_data: the text the adapter will learn: a ``LongTensor`` ``(n, seq)`` of token ids, a list of 1-D token id
            sequences, a ``datasets.Dataset`` with ``input_ids`` (and optionally ``attention_mask``), a list of dicts
            with ``input_ids``, or, with ``tokenizer``, a list of strings (``token_sequences``).
        old_data: what the model must keep doing, in the same forms; or ``BaseModelSamples(...)``, the base model's
            own samples; ``None`` is ``BaseModelSamples()``. Text of what must be kept is the better old side whenever
            it shares the new data's genre: the base model's free samples are its own genre (a chat model's are
            chat), so text that differs from them in genre as well as language can look new to the router. A few
            thousand tokens of it are enough.
        tokenizer: the model's tokenizer, to read ``new_data``, ``old_data`` and ``other_domains`` given as strings
            (each string one sequence, with the tokenizer's special tokens).
        other_domains: ``{name: data}``, the text of other new domains (of other routed adapters), in the forms of
            ``new_data``: negatives in the router's training, pooled with the old side, but not calibrated on (the
            threshold bounds only what must be kept). Name a domain after its learned-route adapter (``{"es":
            spanish}``) and this router outranks that adapter's (``RouterConfig.outranks``: a token both claim goes to
            this one), so that adapter's router, which never saw this domain, need not be refitted.
        adapter_name: the adapter whose router to fit (default: the active learned-route adapter).
        max_old_error: the share of old tokens allowed to reach the expansion, for this fit; default the adapter's
            ``RouterConfig.max_old_error``, else ``DEFAULT_MAX_OLD_ERROR`` for the old side given. The value used is in
            the report and the adapter's ``router_report``.
        progress: show a progress bar while sampling.

    Returns:
        A ``RouterReport``: held-out accuracy on each side, the threshold, the share of the held-out new tokens each
        other fitted router claims, of each other domain's held-out tokens this router claims, and, with the base
        model's samples as the old side, how they differ from the new data. The router is stored in the adapter
        (saved, loaded and deleted with it) and stays frozen while the adapter trains.

    Warns:
        UserWarning: another adapter's fitted router claims more than ``CLAIMED_WARNING`` of the held-out new tokens
            (the warning names it and the fix); the threshold landed above every score (nothing reaches the expansion).

    Raises:
        ValueError: no learned-route adapter, empty or malformed data, too few sequences to hold some out, strings
            without a tokenizer, ``other_domains`` empty or with a name that is not a non-empty string.
        TypeError: data of an unsupported type, ``other_domains`` not a dict.
    """
    from .model import ScaleModel

    scale_model = getattr(model, "base_model", model)
    if not isinstance(scale_model, ScaleModel):
        raise TypeError(
            f"fit_router needs a model made by get_peft_model(model, ScaleConfig(...)), got {type(model).__name__}."
        )
    adapter_name = _learned_route_adapter(scale_model, adapter_name)
    config = scale_model.peft_config[adapter_name]
    settings = config.router
    if max_old_error is not None and not 0 < max_old_error < 0.5:
        raise ValueError(f"fit_router(max_old_error={max_old_error}): a share between 0 and 0.5, e.g. 0.005.")
    base = scale_model.model
    vocab_size = getattr(base.config, "vocab_size", None)
    new_sequences = token_sequences(new_data, "new_data", vocab_size, tokenizer=tokenizer)
    other_sequences = _other_domain_sequences(other_domains, vocab_size, tokenizer)
    router = scale_model.scale_router[adapter_name]
    layer = scale_model.router_layer(adapter_name)

    was_training = base.training
    base.eval()
    try:
        with _adapters_disabled(scale_model):
            old_sequences, old_source, split = _old_side(
                base, old_data, new_sequences, vocab_size, tokenizer, settings.seed, progress
            )
            named = {"new": new_sequences, "old": old_sequences}
            sides = {key: _features(base, layer, router, f"the {key} side", seqs) for key, seqs in named.items()}
            others = {
                name: _features(base, layer, router, f"other_domains[{name!r}]", seqs)
                for name, seqs in other_sequences.items()
            }
    finally:
        base.train(was_training)
    if max_old_error is None:
        max_old_error = settings.max_old_error or DEFAULT_MAX_OLD_ERROR[old_source.split(" in ")[0]]
    if settings.calibrate_on == "cross_fitted" and len(old_sequences) < CROSS_FIT_FOLDS:
        raise ValueError(
            f"fit_router (RouterConfig.calibrate_on='cross_fitted'): the old side has {len(old_sequences)} sequence(s); "
            f"each of the {CROSS_FIT_FOLDS} folds needs one at least. Give more, or shorter, old sequences, or use "
            "RouterConfig(calibrate_on='held_out')."
        )

    generator = torch.Generator().manual_seed(settings.seed)
    parts = {side: _parts(feats, generator) for side, feats in sides.items()}  # fitting, calibration, held out
    # (split after the two sides: without other domains, the same split as before they existed)
    other_parts = {name: _parts(feats, generator) for name, feats in others.items()}
    trial, kept = _fit_trial_and_kept(router, parts, sides, other_parts, others, settings.seed)

    def per_sequence_scores(sequences, params):  # the scores the gate computes (smoothed, as the model routes)
        start = params["start"] if settings.smoothing and settings.smoothing_start == "old" else None
        return sequence_scores(router, sequences, settings.smoothing, params, start, settings.smoothing_fall)

    def scores(sequences, params, first_tokens=None):
        return torch.cat([score[:first_tokens] for score in per_sequence_scores(sequences, params)])

    if settings.calibrate_on == "cross_fitted":  # every old sequence, scored out of fold, instead of the calibration part
        calibration_old = _out_of_fold_scores(router, sides, others, per_sequence_scores, settings.seed)
    else:
        calibration_old = scores(parts["old"][1], trial)
    calibration_new = scores(parts["new"][1], trial)
    fitted_old, fitted_new = scores(sides["old"], kept), scores(sides["new"], kept)
    bounded = fitted_old if settings.calibrate_on == "fitted" else calibration_old  # what max_old_error bounds
    threshold = _threshold(bounded, max_old_error)
    _store_router(router, kept, threshold)

    held_out = {side: per_sequence_scores(parts[side][2], trial) for side in ("old", "new")}  # scored once
    test_old, test_new = (torch.cat(held_out[side]) for side in ("old", "new"))
    first_old, first_new = (torch.cat([score[:FIRST_TOKENS] for score in held_out[side]]) for side in ("old", "new"))

    def share(values, to_expansion=True):
        return float(((values >= threshold) if to_expansion else (values < threshold)).float().mean())

    settings.outranks = sorted(set(other_sequences) & set(_learned_route_adapters(scale_model)) - {adapter_name})
    report = RouterReport(
        adapter_name=adapter_name,
        layer=config.preserve_layers,
        old_source=old_source,
        old_to_base=share(test_old, False),
        new_to_expansion=share(test_new),
        threshold=threshold,
        first_tokens_old_to_base=share(first_old, False),
        first_tokens_new_to_expansion=share(first_new),
        calibration_old_to_base=share(calibration_old, False),
        calibration_new_to_expansion=share(calibration_new),
        fitted_old_to_base=share(fitted_old, False),
        fitted_new_to_expansion=share(fitted_new),
        calibrate_on=settings.calibrate_on,
        max_old_error=max_old_error,
        tokens={side: sum(len(f) for f in feats) for side, feats in sides.items()},
        held_out_tokens={"old": len(test_old), "new": len(test_new)},
        calibration_tokens=len(bounded),
        claimed_by_other_adapters=_claimed_by_other_adapters(scale_model, adapter_name, layer, parts["new"][2]),
        other_to_expansion={name: share(scores(part[2], trial)) for name, part in other_parts.items()},
        other_held_out_tokens={name: sum(len(f) for f in part[2]) for name, part in other_parts.items()},
        format_split=split,
        sample_differences=(
            sample_differences(new_sequences, old_sequences, tokenizer) if old_source == "base model samples" else {}
        ),
    )
    _record_report(config, report)
    _warn_if_claimed(report, settings.outranks)
    _warn_if_closed(report)
    _warn_if_little_new_reaches(report)
    return report


def _old_side(base, old_data, new_sequences, vocab_size, tokenizer, seed: int, progress: bool):
    """Step 1: the old side's sequences, where they come from, and (samples in the new data's format) the split of
    format and content tokens with the draws made and kept."""
    if old_data is None:
        old_data = BaseModelSamples()
    if not isinstance(old_data, BaseModelSamples):
        return token_sequences(old_data, "old_data", vocab_size, tokenizer=tokenizer), "old data", {}
    samples = old_data
    if samples.in_new_data_format:
        sequences = sample_in_format(
            base, new_sequences, samples.count, samples.format_share, samples.batch_size, seed, progress
        )
        split = {"format_share": samples.format_share, **format_split(new_sequences, samples.format_share),
                 "draws": samples.count, "kept": len(sequences)}  # fmt: skip
        return sequences, "base model samples in the new data's format", split
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    if positions is not None and samples.length > positions:
        raise ValueError(
            f"fit_router: BaseModelSamples(length={samples.length}) is longer than the model's {positions} positions; "
            f"choose length <= {positions}."
        )
    prompts = default_prompts(base) if samples.prompts is None else samples.prompts
    sequences = sample_base_model(base, prompts, samples.count, samples.length, samples.batch_size, seed, progress)
    return cut_like_new_data(sequences, new_sequences, prompts, seed), "base model samples", {}


def _features(base, layer, router, what: str, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Step 2: the base model's stream entering the router's layer, per sequence (at least 3: one each to fit,
    calibrate and hold out)."""
    if len(sequences) < 3:
        raise ValueError(
            f"fit_router: {what} has {len(sequences)} sequence(s); at least 3 are needed (one each to fit, "
            "calibrate and hold out). Give more, or shorter, sequences."
        )
    return layer_inputs(base, layer, router.features, sequences, FEATURE_BATCH)


def _parts(features: list, generator: torch.Generator) -> list[list]:
    """The fitting, calibration and held-out parts of one side's sequences (``SPLIT``)."""
    return [[features[i] for i in indices] for indices in _split_sequences(len(features), generator)]


def _fit_trial_and_kept(router, parts: dict, sides: dict, other_parts: dict, others: dict, seed: int):
    """Step 3: the trial router (fitted on the fitting parts; the report and the held-out calibration read it) and
    the kept one (refitted on every sequence: none of the new data is left to a router that never saw it). The
    negatives are the old side and the other domains, pooled. Each with the median of its logits on the old side it
    was fitted on (``TokenRouter.start``, read by 0.1.0 adapters' ``smoothing_start="old"``)."""
    negatives = parts["old"][0] + [f for part in other_parts.values() for f in part[0]]
    trial = _train_router(router, torch.cat(parts["new"][0]), torch.cat(negatives), seed)
    all_negatives = torch.cat(sides["old"] + [f for feats in others.values() for f in feats])
    kept = _train_router(router, torch.cat(sides["new"]), all_negatives, seed)
    trial["start"] = _old_median(router, parts["old"][0], trial)
    kept["start"] = _old_median(router, sides["old"], kept)
    return trial, kept


@torch.no_grad()
def _store_router(router, params: dict, threshold: float) -> None:
    """Step 4: the kept router's parameters and threshold into the adapter's router buffers (marked fitted)."""
    params["threshold"] = torch.tensor([threshold])
    params["fitted"] = torch.ones(1)
    for name, buffer in router.named_buffers():
        buffer.copy_(params[name].to(buffer.device))


def sample_differences(new: list[torch.Tensor], samples: list[torch.Tensor], tokenizer=None, top: int = 5) -> dict:
    """How the base model's samples differ from the new data, for the report (they stand in for the text to keep).

    ``median_length``: tokens per sequence on each side. ``shared_vocabulary``: the share of the new data's tokens
    whose id also occurs in the samples. ``sample_only``: the ``top`` most frequent tokens of the samples that never
    occur in the new data, with their share of the samples' tokens (decoded with ``tokenizer`` when given): a chat
    model's chat markers, say, which tell the router "samples" by genre rather than by language."""
    new_ids, sample_ids = torch.cat(new), torch.cat(samples)
    in_samples = torch.isin(new_ids, sample_ids.unique())
    counts = torch.bincount(sample_ids, minlength=int(new_ids.max()) + 1)
    counts[new_ids.unique()] = 0
    order = counts.sort(descending=True, stable=True).indices[:top]  # (ties: the smaller id first)
    only = [(int(i), float(counts[i]) / len(sample_ids)) for i in order if counts[i] > 0]

    def name(token: int):
        return tokenizer.decode([token]) if tokenizer is not None else token

    return {
        "median_length": {"new": int(torch.tensor([len(s) for s in new]).median()),
                          "samples": int(torch.tensor([len(s) for s in samples]).median())},
        "shared_vocabulary": round(float(in_samples.float().mean()), 4),
        "sample_only": [[name(token), round(share, 4)] for token, share in only],
    }  # fmt: skip


@torch.no_grad()
def _old_median(router, old: list[torch.Tensor], params) -> torch.Tensor:
    """The median of a router's logits on the old tokens it was fitted on (``TokenRouter.start``), ``(1,)``."""
    return router.logits(torch.cat(old), params).median().reshape(1)


def _out_of_fold_scores(
    router, sides: dict, others: dict, score_sequences, seed: int
) -> torch.Tensor:
    """``calibrate_on="cross_fitted"``: every old sequence scored by a router that did not see it. The sequences of
    each side (and of each other domain) are dealt into ``CROSS_FIT_FOLDS`` folds; fold k's old sequences are scored
    (as the gate scores them: ``score_sequences``) by a router trained as the others are on every other fold. The
    tail of these scores is what ``max_old_error`` bounds: estimated on all the old tokens instead of the
    calibration part's fifth of them, where a 1% tail is a few dozen tokens, mostly a sequence's first ones (on
    SmolLM2 the held-out threshold then moved with the machine and the seed)."""
    generator = torch.Generator().manual_seed(seed + 1)
    folds = {name: torch.randperm(len(feats), generator=generator) % CROSS_FIT_FOLDS for name, feats in sides.items()}
    folds.update({name: torch.randperm(len(f), generator=generator) % CROSS_FIT_FOLDS for name, f in others.items()})
    groups = {**sides, **others}

    def outside(name, fold):
        return [feats for feats, k in zip(groups[name], folds[name].tolist()) if k != fold]

    scores = []
    for fold in range(CROSS_FIT_FOLDS):
        negatives = outside("old", fold) + [f for name in others for f in outside(name, fold)]
        new = torch.cat(outside("new", fold))
        params = _train_router(router, new, torch.cat(negatives), seed)
        params["start"] = _old_median(router, outside("old", fold), params)
        inside = [feats for feats, k in zip(sides["old"], folds["old"].tolist()) if k == fold]
        scores += score_sequences(inside, params)
    return torch.cat(scores)


def _other_domain_sequences(other_domains, vocab_size: Optional[int], tokenizer=None) -> dict[str, list[torch.Tensor]]:
    """``other_domains`` checked: name -> its sequences (``token_sequences``); ``{}`` for ``None``."""
    if other_domains is None:
        return {}
    example = "e.g. other_domains={'fr': fr_blocks}"
    if not isinstance(other_domains, dict):
        raise TypeError(
            f"fit_router: other_domains is a {type(other_domains).__name__}; give a dict of domain name -> token ids "
            f"(each in the forms new_data takes), {example}."
        )
    if not other_domains:
        raise ValueError(f"fit_router: other_domains is an empty dict; give None, or name -> token ids ({example}).")
    for name in other_domains:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"fit_router: other_domains has the key {name!r}; its keys name the domains in the report, as "
                f"non-empty strings ({example})."
            )
    return {
        name: token_sequences(data, f"other_domains[{name!r}]", vocab_size, tokenizer=tokenizer)
        for name, data in other_domains.items()
    }


@torch.no_grad()
def sequence_scores(
    router,
    sequences: list[torch.Tensor],
    smoothing: float,
    params=None,
    start: Optional[torch.Tensor] = None,
    fall: Optional[float] = None,
) -> list[torch.Tensor]:
    """The score the gate hook computes for every token of each sequence (features ``(len, d)`` of the stream
    entering the router's layer): ``sigmoid`` of the router's logit, smoothed along the sequence first
    (``smoothing.smooth_logits``, from ``start`` when given) when ``smoothing > 0``. ``params``: as in
    ``TokenRouter.logits``."""
    device = (params or router._buffers)["w_in"].device
    lengths = [len(features) for features in sequences]
    logits = router.logits(torch.cat(sequences)[..., : router.features].to(device), params)
    if smoothing:  # right-padded rows (padding comes after a row's tokens: the causal average never reads it)
        rows = torch.nn.utils.rnn.pad_sequence(list(logits.split(lengths)), batch_first=True)
        mask = torch.arange(rows.shape[1], device=device) < torch.tensor(lengths, device=device)[:, None]
        logits = smooth_logits(rows, smoothing, mask, start=start, fall=fall)[0][mask]
    return list(torch.sigmoid(logits).split(lengths))


@torch.no_grad()
def _claimed_by_other_adapters(scale_model, adapter_name: str, layer: nn.Module, sequences: list[torch.Tensor]) -> dict:
    """Adapter -> the share of the tokens of ``sequences`` (features of the stream entering ``layer``) that its
    fitted router claims, for every learned-route adapter but ``adapter_name`` whose router reads ``layer``: the
    decision the gate hook takes (``TokenRouter.forward``, on the scores smoothed by that adapter's own
    ``RouterConfig.smoothing``), on the features already computed."""
    shares = {}
    for name, router in scale_model.scale_router.items():
        if name == adapter_name or not router.is_fitted or scale_model.router_layer(name) is not layer:
            continue
        config = scale_model.peft_config[name]
        settings = config.router
        start = smoothing_start(name, config, router) if settings.smoothing else None
        scores = torch.cat(
            sequence_scores(router, sequences, settings.smoothing, start=start, fall=settings.smoothing_fall)
        )
        shares[name] = float((scores >= router.threshold[0]).float().mean())
    return shares


def _warn_if_claimed(report: RouterReport, outranks: list[str]) -> None:
    """One warning per other adapter whose router claims more than ``CLAIMED_WARNING`` of the held-out new tokens."""
    adapter = report.adapter_name
    for name, share in report.claimed_by_other_adapters.items():
        if share <= CLAIMED_WARNING or name in outranks:  # outranked: it cannot take a token this one claims
            continue
        warnings.warn(
            f"fit_router: the router of adapter {name!r} claims {share:.1%} of the held-out new tokens of adapter "
            f"{adapter!r} (score at or above its own threshold; more than {CLAIMED_WARNING:.0%}): routed together, "
            f"those tokens can go to {name!r} instead of {adapter!r}. Fit this router with the text of {name!r} as an "
            f"other domain named after its adapter, e.g. fit_router(model, new_data, old_data, other_domains="
            f"{{{name!r}: {name}_data}}, adapter_name={adapter!r}): it then outranks the router of {name!r} (a token "
            f"both claim goes to {adapter!r}) and that router needs no refit (docs/several-domains.md); domains "
            "this close may also be one domain, for one adapter.",
            stacklevel=3,
        )


def _warn_if_little_new_reaches(report: RouterReport) -> None:
    """A warning when old data was given, its threshold was set on old text the router did not see, and less than
    ``LITTLE_NEW_WARNING`` of the held-out new tokens reach the expansion (a closed router has its own warning)."""
    if report.old_source != "old data" or report.calibrate_on == "fitted" or report.threshold > 1.0:
        return
    if report.new_to_expansion >= LITTLE_NEW_WARNING:
        return
    warnings.warn(
        f"fit_router: only {report.new_to_expansion:.1%} of the held-out new tokens reach the expansion of adapter "
        f"{report.adapter_name!r} (threshold {report.threshold:.3f}, set so that at most max_old_error="
        f"{report.max_old_error} of old text the router did not see reaches it); the adapter learns only on the "
        "tokens that reach it. If the new data is new facts in the old data's format and the old data you gave is "
        "exactly what must be kept (a set of facts, a regression set), set RouterConfig(calibrate_on=\"fitted\"): the "
        "threshold is then set on that data itself (docs/router.md). Otherwise give more new data, or a larger "
        "max_old_error.",
        stacklevel=3,
    )


def _warn_if_closed(report: RouterReport) -> None:
    """A warning when the threshold is above 1: no score reaches it, so the adapter never computes its expansion."""
    if report.threshold <= 1.0:
        return
    warnings.warn(
        f"fit_router: more than max_old_error={report.max_old_error} of the old calibration tokens score 1.0 (the router "
        f"is certain they are new), so the threshold is {report.threshold!r}, above every score: no token reaches "
        f"the expansion of adapter {report.adapter_name!r}, which then learns nothing. The old side looks like the new "
        "data: give old data that differs from it (old_data), more or longer new data, or a larger max_old_error.",
        stacklevel=3,
    )


def _threshold(old_scores: torch.Tensor, max_old_error: float) -> float:
    """The lowest threshold, at least 0.5, at which at most ``max_old_error`` of ``old_scores`` reach it."""
    allowed = math.floor(max_old_error * len(old_scores))  # old tokens that may reach the expansion
    highest = old_scores.sort(descending=True).values
    if allowed >= len(highest):
        return 0.5
    return max(0.5, float(torch.nextafter(highest[allowed], torch.tensor(2.0))))


def _record_report(config, report: RouterReport) -> None:
    """Keep the held-out accuracy in the adapter's config, so the saved adapter (and its model card) says it."""
    config.router_report = {
        "old_to_base": round(report.old_to_base, 4),
        "new_to_expansion": round(report.new_to_expansion, 4),
        "old_source": report.old_source,
        "threshold": report.threshold,
        "calibrate_on": report.calibrate_on,
        "max_old_error": report.max_old_error,  # (with calibrate_on, the router's seed and the data: a refit's inputs)
        "fitted_new_to_expansion": round(report.fitted_new_to_expansion, 4),
        # (reports saved before it existed have no such key)
        "claimed_by_other_adapters": {
            name: round(share, 4) for name, share in report.claimed_by_other_adapters.items()
        },
        # (nor this one; empty when the router was fitted without other_domains)
        "other_to_expansion": {name: round(share, 4) for name, share in report.other_to_expansion.items()},
    }


def _learned_route_adapters(scale_model) -> list[str]:
    return [
        name
        for name, config in scale_model.peft_config.items()
        if config.variant == "route" and config.route_rule == "learned"
    ]


def _learned_route_adapter(scale_model, adapter_name: Optional[str]) -> str:
    learned = _learned_route_adapters(scale_model)
    if adapter_name is not None:
        if adapter_name not in learned:
            raise ValueError(
                f"fit_router: adapter {adapter_name!r} has no learned router (learned-route adapters: {learned}). "
                "Create it with ScaleConfig(variant='route', route_rule='learned', preserve_layers=...)."
            )
        return adapter_name
    active = [name for name in scale_model.active_adapters if name in learned]
    if len(active) == 1:
        return active[0]
    if not learned:
        raise ValueError(
            "fit_router: this model has no learned-route SCALE adapter. Create it with "
            "ScaleConfig(ffn_expansion=..., variant='route', route_rule='learned', preserve_layers=...)."
        )
    raise ValueError(f"fit_router: several learned-route adapters ({learned}); say which with adapter_name=.")


class _adapters_disabled:
    """The base model's computation: SCALE's layers switched off, and back on only if they were on."""

    def __init__(self, scale_model) -> None:
        self.scale_model = scale_model

    def __enter__(self):
        from .layer import ScaleTunerLayer

        layers = [m for m in self.scale_model.model.modules() if isinstance(m, ScaleTunerLayer)]
        self.was_enabled = not layers[0].disable_adapters if layers else False
        if self.was_enabled:
            self.scale_model.disable_adapter_layers()

    def __exit__(self, *exc):
        if self.was_enabled:
            self.scale_model.enable_adapter_layers()
        return False


# ------------------------------------------------------------------------------------------------- the Trainer


class RouterFitCallback(TrainerCallback):
    """Fit the learned router before the ``Trainer`` trains, on the first training batches as the new side.

    ``Trainer(..., callbacks=[peft_scale.RouterFitCallback()])``: at the start of training, every learned-route
    adapter whose router is not fitted yet is fitted with ``fit_router``: the new side is ``new_data`` or, by
    default, the first ``num_batches`` batches of the training data loader (so do not use the default when the
    training stream mixes in replayed old data: pass ``new_data``); the old side is ``old_data`` or the base model's
    own samples. The report is logged and kept in ``self.reports``. A router that is already fitted (e.g. loaded
    with the adapter, or when resuming) is left as it is.

    Args:
        new_data: the new side, as in ``fit_router`` (``None``: the first ``num_batches`` training batches).
        old_data: the old side, as in ``fit_router`` (``None``: the base model's own samples).
        num_batches: training batches to take as the new side when ``new_data`` is not given.
        **fit_kwargs: further arguments of ``fit_router``.
    """

    def __init__(self, new_data=None, old_data=None, num_batches: int = 8, **fit_kwargs) -> None:
        self.new_data = new_data
        self.old_data = old_data
        self.num_batches = num_batches
        self.fit_kwargs = fit_kwargs
        self.reports: list[RouterReport] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        scale_model = getattr(model, "base_model", model)
        routers = getattr(scale_model, "scale_router", {})
        for name, router in routers.items():
            if router.is_fitted:
                continue
            new_data = self.new_data if self.new_data is not None else self._first_batches(train_dataloader)
            report = fit_router(model, new_data, self.old_data, adapter_name=name, **self.fit_kwargs)
            logger.warning(str(report))
            self.reports.append(report)

    def _first_batches(self, loader) -> list[dict]:
        if loader is None:
            raise ValueError("RouterFitCallback: no training data loader to take new_data from; pass new_data.")
        rows = []
        for index, batch in enumerate(loader):
            if index == self.num_batches:
                break
            mask = batch.get("attention_mask")
            for row, ids in enumerate(batch["input_ids"]):
                rows.append({"input_ids": ids.cpu(), "attention_mask": None if mask is None else mask[row].cpu()})
        return rows
