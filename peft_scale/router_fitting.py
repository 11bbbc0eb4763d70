"""Fitting the learned router of a SCALE-Route adapter: ``fit_router`` and ``RouterFitCallback``.

The router (``peft_scale.routing.TokenRouter``) reads the stream entering layer ``L = preserve_layers``, which is
the base model's own hidden state (nothing below ``L`` can change it). So it is fitted once, before the adapter
trains, on frozen features, and it never drifts while the adapter trains:

1. Features: every token of the new-domain data and of the old side, through the base model (adapter disabled)
   up to layer ``L`` only (the forward pass stops there).
2. The old side is the user's old data, or, with ``old_data=None``, the base model's own samples
   (self-synthesised rehearsal: what the base model produces is by definition what it already does).
   When the new data are windows cut from running text (they do not start with the samples' first prompt token,
   e.g. ``<s>``), each sample is cut the same way: a random number of its first tokens (up to a quarter) is
   dropped and the rest is read as a sequence of its own. Otherwise the router learns "starts with ``<s>``"
   instead of "is old text" (measured on SmolLM2: 10.4% of real English blocks went to the expansion with uncut
   samples, whose held-out report looked fine).
3. Sequences (not tokens: neighbouring tokens are alike) are split into a fitting, a calibration and a held-out
   part. A router is trained on the fitting part with a class-balanced logistic loss.
4. The threshold is biased towards the base model: a wrong "expansion" on old text costs forgetting, a wrong
   "base model" on new text only a little learning. With ``calibrate_on="held_out"`` (the default: the old data
   is a sample of what must be kept, e.g. a language) it is the lowest threshold (at least 0.5) at which at most
   ``max_old_error`` of the calibration part's old tokens reach the expansion: a bound for old text the router
   has never seen. With ``calibrate_on="cross_fitted"`` the same bound is measured on every old sequence instead of
   the calibration part: ``CROSS_FIT_FOLDS`` more routers, each fitted on four fifths of the sequences, score the
   fifth they did not see. The bound's tail is then read off five times as many old tokens (on SmolLM2 the
   calibration part's 1% tail was 16 tokens, and the threshold moved with the machine and the seed).
   With ``router_smoothing_start="old"`` the smoothed average starts from the median of the
   router's logits on the old side's tokens (``TokenRouter.start``), set here for the trial and the kept router.
5. The report gives, on the held-out part, the share of old tokens routed to the base model and of new tokens
   routed to the expansion.
6. The router that is kept is then refitted on every sequence of both sides (the same training), so that none of
   the user's new data is left to a router that never saw it: the adapter trains on all of ``new_data``, and a
   router fitted on 60% of it sent the other 40% to the base model far more often (biographies: 37.5% of the
   unfitted questions' first-answer positions reached the expansion, against 61.7% of the fitted ones).
   With ``calibrate_on="fitted"`` (the old data is the whole of what must be kept: a set of facts, a regression
   set) the threshold is set on this final router's scores of all the old data instead, so that at most
   ``max_old_error`` of exactly those tokens reach the expansion; the held-out report then says what old text
   outside that set would get. The report's ``fitted_*`` shares are the final router's on all the data.
7. With one routed adapter per domain, the other adapters' fitted routers that read the same layer (those that can
   be routed together with this one) score this side's held-out new tokens: the share each claims (score at or
   above its own threshold) is the report's ``claimed_by_other_adapters``, and above ``CLAIMED_WARNING`` a warning
   says which router to refit. Under the joint rule a token one of them claims can go to it instead of this
   adapter; an earlier router that never saw this domain typically claims much of it (``routing_confusion`` then
   shows the same on the whole model).
8. ``other_domains`` (the text of the other routed adapters' domains) are negatives in the training, pooled with the
   old side, but not part of the calibration: the threshold bounds only what must be kept (forgetting). A token of
   another routed domain that this router also claims is resolved by the joint rule when both adapters are active
   (the outranking router, item 9, or else the more confident one takes it): an error there costs transfer between
   two new domains, not forgetting.
   The report's ``other_to_expansion`` is the share of each such domain's held-out tokens this router claims.
9. A domain of ``other_domains`` named like another learned-route adapter of the model is that adapter's: this
   router *outranks* it (``outranks``, recorded in the config; ``routing.outranking``): routed together, a token
   both claim goes to this adapter, since only this router learned the difference. So the earlier adapter's
   router is not refitted: its decisions on its own domain stay as they were, except on the tokens this router
   claims (its ``other_to_expansion``), and no warning says to refit it.
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

from .format_sampling import format_split, sample_in_format
from .routing import rms_normalise, smooth_logits, smoothing_start

logger = logging.get_logger(__name__)

SPLIT = (0.6, 0.2, 0.2)  # fitting, calibration, held-out: shares of each side's sequences
FIRST_TOKENS = 8  # the report also gives the accuracy on each sequence's first tokens, which have little context
# above this share of an adapter's held-out new tokens claimed by another adapter's router, fit_router warns: routed
# together, one token in twenty could go to the wrong domain's adapter (the threshold itself lets 1% of old in)
CLAIMED_WARNING = 0.05
CALIBRATIONS = ("held_out", "cross_fitted", "fitted")  # fit_router's calibrate_on
SAMPLE_FORMATS = ("free", "new_data")  # fit_router's sample_format (old_data=None)
CROSS_FIT_FOLDS = 5  # calibrate_on="cross_fitted": routers fitted, each on four fifths of the sequences


@dataclass
class RouterReport:
    """What ``fit_router`` measured, on held-out sequences it neither fitted nor calibrated on.

    Attributes:
        adapter_name: the adapter whose router was fitted.
        layer: the decoder layer whose input the router reads (``preserve_layers``).
        old_source: ``"old data"``, ``"base model samples"`` or (``sample_format="new_data"``) ``"base model samples in
            the new data's format"``.
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
        calibrate_on: ``"held_out"``, ``"cross_fitted"`` or ``"fitted"``: where the threshold was set.
        tokens: ``{"old": n, "new": n}``: tokens of each side the router saw (all parts).
        held_out_tokens: ``{"old": n, "new": n}`` in the held-out part.
        claimed_by_other_adapters: ``{adapter: share}`` for every other learned-route adapter of the model whose
            router is fitted and reads the same layer (so can be routed together with this one): the share of the
            held-out new tokens that its router claims (score at or above its own threshold), as it stood when this
            router was fitted. Routed together, such a token goes to whichever claiming router scores highest
            (unless one outranks the other: ``outranks``), so it can miss this adapter; above ``CLAIMED_WARNING``
            ``fit_router`` warns. Empty when there is no such adapter. (The reverse, this router claiming another
            domain's tokens, is ``1 - old_to_base`` with that domain's text in ``old_data``.)
        other_to_expansion: ``{domain: share}`` for every domain given in ``other_domains``: the share of its held-out
            tokens that this router claims (score at or above the threshold, which was not calibrated on them).
            Routed together with that domain's adapter, this router takes such a token when it outranks that
            adapter's (``outranks``), else the more confident one does; with this adapter active alone, it goes to
            this adapter. Empty without ``other_domains``.
        other_held_out_tokens: ``{domain: n}``: held-out tokens of each of ``other_domains``.
        outranks: the other learned-route adapters that ``other_domains`` names (sorted): routed together, this
            router takes a token it claims from them (``routing.outranking``), unless one was fitted against this
            adapter's domain too. Their ``claimed_by_other_adapters`` shares then cannot take a token from this
            adapter (only the ones this router does not claim, which would otherwise go to the base model).
        smoothing: the adapter's ``router_smoothing``: with ``a > 0`` every share above and the threshold are those
            of the smoothed decisions (the moving average over each sequence's tokens, as the model routes).
        smoothing_start: the adapter's ``router_smoothing_start`` (``"token"`` or ``"old"``), where that average
            starts.
        smoothing_fall: the adapter's ``router_smoothing_fall`` (``None``: ``smoothing`` both ways).
        calibration_tokens: the old tokens the threshold was set on (the calibration part's; with
            ``calibrate_on="cross_fitted"`` or ``"fitted"`` every old token); ``max_old_error`` of them may reach
            the expansion. 0 in a report made before it existed.
        format_split: with ``sample_format="new_data"``: ``format_share`` and the split it made
            (``format_sampling.format_split``: the format tokens, the share of new sequences the rarest of them is
            in, the share the most frequent content token is in) and the draws made and kept; else empty.
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
    tokens: dict
    held_out_tokens: dict
    claimed_by_other_adapters: dict = field(default_factory=dict)
    other_to_expansion: dict = field(default_factory=dict)
    other_held_out_tokens: dict = field(default_factory=dict)
    smoothing: float = 0.0
    smoothing_start: str = "token"
    outranks: list = field(default_factory=list)
    smoothing_fall: Optional[float] = None
    calibration_tokens: int = 0
    format_split: dict = field(default_factory=dict)

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
                f"{name!r} {share:.2%}" + (" (outranked: a token both claim goes to this adapter)" * (name in self.outranks))
                for name, share in self.claimed_by_other_adapters.items()
            )
            claimed += f"\n  held-out new tokens claimed by other adapters' routers: {shares}"
        if self.old_source.startswith("base model samples"):
            # measured on the biographies: samples unlike the old task (prose from a QA-tuned model) gave 99.3% here
            # while 43% of the old questions' answer positions reached the expansion
            claimed += (
                "\n  the old shares are measured on the base model's own samples, not on the old task's text: "
                "check what must be kept on text of it"
            )
        smoothed = f"; score smoothed over preceding tokens, a = {self.smoothing}" if self.smoothing else ""
        if self.smoothing and self.smoothing_fall is not None:
            smoothed += f", falling with {self.smoothing_fall}"
        if self.smoothing and self.smoothing_start == "old":
            smoothed += ", from the old side's median logit"
        return (
            f"SCALE router of adapter {self.adapter_name!r} (reads the input of layer {self.layer}; old side: "
            f"{self.old_source}; threshold {self.threshold:.3f}{smoothed})\n"
            f"  held-out old tokens routed to the base model: {self.old_to_base:.2%} of {self.held_out_tokens['old']:,}\n"
            f"  held-out new tokens routed to the expansion:  {self.new_to_expansion:.2%} of "
            f"{self.held_out_tokens['new']:,}\n"
            f"  on the first {FIRST_TOKENS} tokens of each sequence: {self.first_tokens_old_to_base:.2%} (old), "
            f"{self.first_tokens_new_to_expansion:.2%} (new)\n"
            f"  the kept router (refitted on all sequences) on all of them: {self.fitted_old_to_base:.2%} of old "
            f"tokens to the base model, {self.fitted_new_to_expansion:.2%} of new tokens to the expansion "
            f"(threshold set on the {self.calibration_tokens:,} {self.calibrate_on.replace('_', '-')} old tokens)"
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
        captured.append(hidden[..., :features].float())
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
            "beginning-of-text token, but this model has no bos_token_id. Pass sample_prompts (a LongTensor of "
            "shape (n, p) of prompt token ids) or old_data."
        )
    return torch.tensor([[bos]])


# ---------------------------------------------------------------------------------------------------- fitting


def _split_sequences(count: int, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
    order = torch.randperm(count, generator=generator).tolist()
    n_cal = max(1, round(SPLIT[1] * count))
    n_test = max(1, round(SPLIT[2] * count))
    return order[n_cal + n_test :], order[:n_cal], order[n_cal : n_cal + n_test]


def _train_router(router, new: torch.Tensor, old: torch.Tensor, steps: int, lr: float, weight_decay: float, seed: int):
    """Class-balanced logistic regression of ``router``'s score on fitting features (full batch, Adam)."""
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
    optimizer = torch.optim.Adam(trained, lr=lr)
    labels = torch.cat([torch.ones(len(new)), torch.zeros(len(old))])
    # each side weighs as much as the other, whatever their token counts
    weights = torch.cat([torch.full((len(new),), 0.5 / len(new)), torch.full((len(old),), 0.5 / len(old))])
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            logits = router.logits(pooled, params)
            loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum()
            loss = loss + weight_decay * params["w_in"].pow(2).sum()
            loss.backward()
            optimizer.step()
    return {name: tensor.detach() for name, tensor in params.items()}


def fit_router(
    model: nn.Module,
    new_data: TokenData,
    old_data: Optional[TokenData] = None,
    *,
    other_domains: Optional[dict] = None,
    adapter_name: Optional[str] = None,
    num_samples: int = 64,
    sample_length: int = 128,
    sample_prompts: Optional[torch.Tensor] = None,
    sample_format: str = "free",
    format_share: float = 0.05,
    max_old_error: float = 0.01,
    calibrate_on: str = "held_out",
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> RouterReport:
    """Fit the learned router of a SCALE-Route adapter to tell ``new_data``'s tokens from the old side's.

    Args:
        model: a ``PeftModel`` (or ``ScaleModel``) with a ``ScaleConfig(variant="route", route_rule="learned")``
            adapter.
        new_data: token ids of the text the adapter will learn: a ``LongTensor`` ``(n, seq)``, a list of 1-D token
            id sequences, a ``datasets.Dataset`` with ``input_ids`` (and optionally ``attention_mask``), or a list
            of dicts (``token_sequences``).
        old_data: token ids of what the model must keep doing, in the same forms; ``None`` samples the old side
            from the base model itself (``num_samples`` sequences of ``sample_length`` tokens, each started from
            ``sample_prompts``, default the beginning-of-text token; cut into windows when ``new_data`` is windows
            of running text, see ``cut_like_new_data``), or with ``sample_format="new_data"`` in the new data's format.
        other_domains: ``{name: token ids}`` (each in the same forms as ``new_data``; the name is how the report
            calls it, e.g. the other adapter's name): the text of the other routed adapters' domains, for one
            routed adapter per domain. Its tokens are negatives when the router trains (pooled with the old side:
            each token weighs the same, and the two together as much as ``new_data``), but the threshold is
            calibrated on the old side only, so ``max_old_error`` bounds forgetting only. Between routed domains an
            error costs transfer, not forgetting, and the joint rule resolves a token two active routers claim (the
            outranking or else the more confident one takes it); in ``old_data`` instead, another domain close to
            this one raises the threshold and sends much of this domain's own text to the base model (issue 12: Spanish and French,
            74.8% and 71.0% of their own tokens reached their adapters). The risk: with this adapter active alone,
            the other domains' tokens it claims (the report's ``other_to_expansion``) go to it. Split like the rest
            (fit, calibrate, held out; at least 3 sequences each). Name a domain after its learned-route adapter
            (``{"es": spanish}``) and this router outranks that adapter's (a token both claim goes to this one,
            the report's ``outranks``), so that adapter's router, which never saw this domain, need not be refitted.
        adapter_name: the adapter whose router to fit (default: the active learned-route adapter).
        sample_format: how the old side is sampled when ``old_data`` is ``None``. ``"free"`` (default): the base
            model continues ``sample_prompts``. ``"new_data"`` (``peft_scale.format_sampling``): ``num_samples``
            draws, each a copy of a new sequence (cycled) whose format tokens are kept and whose content the base
            model fills in (the last content run, the answer, as long as the model makes it); repeats and draws
            that write back a new sequence's content are dropped. For new facts in a format the model already
            handles (measured on the biographies: the old task's answer positions reaching the expansion fell from
            42% to 2-4%, and routed SCALE kept 0.97-0.98 of the old task with no old data); not for a new language
            or domain, whose content is the new part. ``sample_length`` and ``sample_prompts`` do not apply.
        format_share: with ``sample_format="new_data"``, a token in at least this share of the new sequences is a
            format token (copied); the others are content (filled in by the base model). Set it below the share of
            the template's words and above that of the most frequent name or value: on the biographies (6
            templates: each word in >= 16.7%, names in <= 6%) 0.1 kept three frequent names out of the format,
            which 0.05 copied into draws, and with them new people labelled old.
        max_old_error: the share of old tokens allowed to reach the expansion; sets the threshold.
        calibrate_on: where that share is measured. ``"held_out"`` (default): on old sequences the router was not
            fitted on (the calibration part, a fifth of them), a bound for unseen old text (the old data is a
            sample of what to keep: a language, a domain). ``"cross_fitted"``: the same bound, measured on every
            old sequence, each scored by one of ``CROSS_FIT_FOLDS`` routers fitted on the other four fifths (five
            more router fits: about 100 s for 64 + 64 SmolLM2 blocks of 128 tokens on a 2-core CPU): a steadier
            threshold where ``max_old_error`` is small (the bound is then a tail of few tokens). ``"fitted"``: on
            all the given old data, scored by the kept router (the old data *is* what must be kept: a set of facts,
            a regression set); lower thresholds, more new data learned, and the
            held-out report says what unseen old text would get.
        steps, lr, weight_decay: the router's training (full batch, Adam).
        batch_size: sequences per forward pass of the base model (features and sampling); larger samples faster
            (on a 2-core CPU, 32 sampled SmolLM2-135M 2.6x faster than 8).
        seed: the seed of the sampling, the split and the router's initialisation.
        progress: show a progress bar while sampling.

    Returns:
        A ``RouterReport``: held-out accuracy on each side, the chosen threshold, the share of the held-out new
        tokens that each other fitted router claims (``claimed_by_other_adapters``) and the share of each other
        domain's held-out tokens this router claims (``other_to_expansion``). The router is stored in the
        adapter (saved, loaded and deleted with it) and stays frozen while the adapter trains.

    Warns:
        UserWarning: another adapter's fitted router claims more than ``CLAIMED_WARNING`` (5%) of the held-out new
            tokens; the warning names it and the fix (refit it with this data in its old side).

    Raises:
        ValueError: no learned-route adapter, empty or malformed data, too few sequences to hold some out,
            ``other_domains`` empty or with a name that is not a non-empty string.
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
    if not 0 < max_old_error < 0.5:
        raise ValueError(f"fit_router(max_old_error={max_old_error}): a share between 0 and 0.5, e.g. 0.01.")
    if sample_format not in SAMPLE_FORMATS:
        raise ValueError(
            f"fit_router(sample_format={sample_format!r}): 'free' (the base model continues sample_prompts) or "
            "'new_data' (the base model fills in the content of copies of the new data's sequences)."
        )
    if sample_format == "new_data":
        if old_data is not None:
            raise ValueError(
                "fit_router(sample_format='new_data') samples the old side from the base model, but old_data was "
                "given too; pass one of them (old_data=None to sample)."
            )
        if sample_prompts is not None:
            raise ValueError(
                "fit_router(sample_format='new_data'): sample_prompts do not apply (each draw copies a new sequence's "
                "format); drop them, or use sample_format='free'."
            )
        if not 0 < format_share <= 1:
            raise ValueError(f"fit_router(format_share={format_share}): a share of the new sequences in (0, 1], e.g. 0.05.")
    if calibrate_on not in CALIBRATIONS:
        raise ValueError(
            f"fit_router(calibrate_on={calibrate_on!r}): 'held_out' (the threshold bounds the old tokens reaching the "
            "expansion on old text the router has not seen, measured on the calibration part), 'cross_fitted' (the "
            f"same bound, measured on every old sequence by {CROSS_FIT_FOLDS} routers that did not see it) or "
            "'fitted' (on the old data given)."
        )
    base = scale_model.model
    vocab_size = getattr(base.config, "vocab_size", None)
    new_sequences = token_sequences(new_data, "new_data", vocab_size)
    other_sequences = _other_domain_sequences(other_domains, vocab_size)
    router = scale_model.scale_router[adapter_name]
    layer = scale_model.router_layer(adapter_name)
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    if old_data is None and sample_format == "free" and positions is not None and sample_length > positions:
        raise ValueError(
            f"fit_router: sample_length={sample_length} is longer than the model's {positions} positions; choose "
            f"sample_length <= {positions}."
        )

    was_training = base.training
    base.eval()
    try:
        with _adapters_disabled(scale_model):
            split = {}  # the format split and the draws (sample_format="new_data"), for the report
            if sample_format == "new_data":  # (old_data is None: checked above)
                old_sequences = sample_in_format(
                    base, new_sequences, num_samples, format_share, batch_size, seed, progress
                )
                old_source = "base model samples in the new data's format"
                split = {"format_share": format_share, **format_split(new_sequences, format_share),
                         "draws": num_samples, "kept": len(old_sequences)}
            elif old_data is None:
                prompts = default_prompts(base) if sample_prompts is None else torch.as_tensor(sample_prompts).long()
                if prompts.dim() != 2:
                    raise ValueError("fit_router: sample_prompts must be a LongTensor of shape (n, prompt_length).")
                old_sequences = sample_base_model(base, prompts, num_samples, sample_length, batch_size, seed, progress)
                old_sequences = cut_like_new_data(old_sequences, new_sequences, prompts, seed)
                old_source = "base model samples"
            else:
                old_sequences = token_sequences(old_data, "old_data", vocab_size)
                old_source = "old data"
            sides, others = {}, {}
            named = [("the new side", sides, "new", new_sequences), ("the old side", sides, "old", old_sequences)]
            named += [(f"other_domains[{name!r}]", others, name, seqs) for name, seqs in other_sequences.items()]
            if calibrate_on == "cross_fitted" and len(old_sequences) < CROSS_FIT_FOLDS:
                raise ValueError(
                    f"fit_router(calibrate_on='cross_fitted'): the old side has {len(old_sequences)} sequence(s); "
                    f"each of the {CROSS_FIT_FOLDS} folds needs one at least. Give more, or shorter, old sequences, or "
                    "use calibrate_on='held_out'."
                )
            for what, into, key, sequences in named:
                if len(sequences) < 3:
                    raise ValueError(
                        f"fit_router: {what} has {len(sequences)} sequence(s); at least 3 are needed (one each to "
                        "fit, calibrate and hold out). Give more, or shorter, sequences."
                    )
                into[key] = layer_inputs(base, layer, router.features, sequences, batch_size)
    finally:
        base.train(was_training)

    generator = torch.Generator().manual_seed(seed)
    splits = {side: _split_sequences(len(feats), generator) for side, feats in sides.items()}
    parts = {side: [[sides[side][i] for i in idx] for idx in split] for side, split in splits.items()}  # sequences
    # (split after the two sides: without other domains, the same split as before they existed)
    other_parts = {
        name: [[feats[i] for i in idx] for idx in _split_sequences(len(feats), generator)]
        for name, feats in others.items()
    }
    # the router trains per token; its scores are then those the gate computes (smoothed along each sequence when
    # router_smoothing > 0), for the calibration, the threshold and every share of the report
    # the negatives: the old side and the other domains, pooled (the threshold below reads the old side only)
    negatives = parts["old"][0] + [f for part in other_parts.values() for f in part[0]]
    trial = _train_router(router, torch.cat(parts["new"][0]), torch.cat(negatives), steps, lr, weight_decay, seed)
    all_negatives = torch.cat(sides["old"] + [f for feats in others.values() for f in feats])
    kept = _train_router(router, torch.cat(sides["new"]), all_negatives, steps, lr, weight_decay, seed)
    # where a smoothed average starts with router_smoothing_start="old": the logit of typical old text, the median of
    # each router's logits on the old side it was fitted on (robust to the few old tokens it scores high; stored
    # whatever the option, so that it can be switched on without refitting)
    with torch.no_grad():
        trial["start"] = _old_median(router, parts["old"][0], trial)
        kept["start"] = _old_median(router, sides["old"], kept)
    smoothing = config.router_smoothing
    start_on = smoothing and config.router_smoothing_start == "old"

    def scores(sequences, params, first_tokens=None):
        return torch.cat([score[:first_tokens] for score in per_sequence_scores(sequences, params)])

    def per_sequence_scores(sequences, params):
        return sequence_scores(
            router, sequences, smoothing, params, params["start"] if start_on else None, config.router_smoothing_fall
        )

    if calibrate_on == "cross_fitted":  # every old sequence, scored out of fold, instead of the calibration part
        calibration_old = _out_of_fold_scores(router, sides, others, per_sequence_scores, steps, lr, weight_decay, seed)
    else:
        calibration_old = scores(parts["old"][1], trial)
    calibration_new = scores(parts["new"][1], trial)
    fitted_old, fitted_new = scores(sides["old"], kept), scores(sides["new"], kept)
    bounded = fitted_old if calibrate_on == "fitted" else calibration_old  # the old scores max_old_error bounds
    threshold = _threshold(bounded, max_old_error)
    kept["threshold"] = torch.tensor([threshold])
    kept["fitted"] = torch.ones(1)
    with torch.no_grad():
        for name, buffer in router.named_buffers():
            buffer.copy_(kept[name].to(buffer.device))
    held_out = {side: per_sequence_scores(parts[side][2], trial) for side in ("old", "new")}  # scored once
    test_old, test_new = (torch.cat(held_out[side]) for side in ("old", "new"))
    first_old, first_new = (torch.cat([score[:FIRST_TOKENS] for score in held_out[side]]) for side in ("old", "new"))
    report = RouterReport(
        adapter_name=adapter_name,
        layer=config.preserve_layers,
        old_source=old_source,
        old_to_base=float((test_old < threshold).float().mean()),
        new_to_expansion=float((test_new >= threshold).float().mean()),
        threshold=threshold,
        first_tokens_old_to_base=float((first_old < threshold).float().mean()),
        first_tokens_new_to_expansion=float((first_new >= threshold).float().mean()),
        calibration_old_to_base=float((calibration_old < threshold).float().mean()),
        calibration_new_to_expansion=float((calibration_new >= threshold).float().mean()),
        fitted_old_to_base=float((fitted_old < threshold).float().mean()),
        fitted_new_to_expansion=float((fitted_new >= threshold).float().mean()),
        calibrate_on=calibrate_on,
        tokens={side: sum(len(f) for f in feats) for side, feats in sides.items()},
        held_out_tokens={"old": len(test_old), "new": len(test_new)},
        claimed_by_other_adapters=_claimed_by_other_adapters(scale_model, adapter_name, layer, parts["new"][2]),
        other_to_expansion={
            name: float((scores(part[2], trial) >= threshold).float().mean()) for name, part in other_parts.items()
        },
        other_held_out_tokens={name: sum(len(f) for f in part[2]) for name, part in other_parts.items()},
        smoothing=smoothing,
        smoothing_start=config.router_smoothing_start,
        outranks=sorted(set(other_sequences) & set(_learned_route_adapters(scale_model)) - {adapter_name}),
        smoothing_fall=config.router_smoothing_fall,
        calibration_tokens=len(bounded),
        format_split=split,
    )
    _record_report(config, report)
    _warn_if_claimed(report)
    _warn_if_closed(report, max_old_error)
    return report


@torch.no_grad()
def _old_median(router, old: list[torch.Tensor], params) -> torch.Tensor:
    """The median of a router's logits on the old tokens it was fitted on (``TokenRouter.start``), ``(1,)``."""
    return router.logits(torch.cat(old), params).median().reshape(1)


def _out_of_fold_scores(
    router, sides: dict, others: dict, score_sequences, steps: int, lr: float, weight_decay: float, seed: int
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
        params = _train_router(router, new, torch.cat(negatives), steps, lr, weight_decay, seed)
        params["start"] = _old_median(router, outside("old", fold), params)
        inside = [feats for feats, k in zip(sides["old"], folds["old"].tolist()) if k == fold]
        scores += score_sequences(inside, params)
    return torch.cat(scores)


def _other_domain_sequences(other_domains, vocab_size: Optional[int]) -> dict[str, list[torch.Tensor]]:
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
    return {name: token_sequences(data, f"other_domains[{name!r}]", vocab_size) for name, data in other_domains.items()}


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
    (``routing.smooth_logits``, from ``start`` when given) when ``smoothing > 0``. ``params``: as in
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
    ``router_smoothing``), on the features already computed."""
    shares = {}
    for name, router in scale_model.scale_router.items():
        if name == adapter_name or not router.is_fitted or scale_model.router_layer(name) is not layer:
            continue
        config = scale_model.peft_config[name]
        start = smoothing_start(name, config, router) if config.router_smoothing else None
        scores = torch.cat(
            sequence_scores(router, sequences, config.router_smoothing, start=start, fall=config.router_smoothing_fall)
        )
        shares[name] = float((scores >= router.threshold[0]).float().mean())
    return shares


def _warn_if_claimed(report: RouterReport) -> None:
    """One warning per other adapter whose router claims more than ``CLAIMED_WARNING`` of the held-out new tokens."""
    adapter = report.adapter_name
    for name, share in report.claimed_by_other_adapters.items():
        if share <= CLAIMED_WARNING or name in report.outranks:  # outranked: it cannot take a token this one claims
            continue
        warnings.warn(
            f"fit_router: the router of adapter {name!r} claims {share:.1%} of the held-out new tokens of adapter "
            f"{adapter!r} (score at or above its own threshold; more than {CLAIMED_WARNING:.0%}): routed together, "
            f"those tokens can go to {name!r} instead of {adapter!r}. Fit this router with the text of {name!r} as an "
            f"other domain named after its adapter, e.g. fit_router(model, new_data, old_data, other_domains="
            f"{{{name!r}: {name}_data}}, adapter_name={adapter!r}): it then outranks the router of {name!r} (a token "
            f"both claim goes to {adapter!r}) and that router needs no refit (one routed adapter per domain, in the "
            "README); domains this close may also be one domain, for one adapter.",
            stacklevel=3,
        )


def _warn_if_closed(report: RouterReport, max_old_error: float) -> None:
    """A warning when the threshold is above 1: no score reaches it, so the adapter never computes its expansion."""
    if report.threshold <= 1.0:
        return
    warnings.warn(
        f"fit_router: more than max_old_error={max_old_error} of the old calibration tokens score 1.0 (the router "
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
        "smoothing": report.smoothing,  # (reports saved before it existed have no such key: 0)
        "smoothing_start": report.smoothing_start,  # (nor this one: "token")
        "smoothing_fall": report.smoothing_fall,  # (nor this one: None)
        "calibrate_on": report.calibrate_on,
        "fitted_new_to_expansion": round(report.fitted_new_to_expansion, 4),
        # (reports saved before it existed have no such key)
        "claimed_by_other_adapters": {
            name: round(share, 4) for name, share in report.claimed_by_other_adapters.items()
        },
        # (nor this one; empty when the router was fitted without other_domains)
        "other_to_expansion": {name: round(share, 4) for name, share in report.other_to_expansion.items()},
        # (nor this one: none outranked, the joint rule reads it, routing.outranked_adapters)
        "outranks": list(report.outranks),
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
        new_data, old_data: as in ``fit_router``.
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
