"""What is measured after (and during) continual pre-training: learning, and forgetting three ways.

Learning
    perplexity of held-out new-language text: ``exp`` of the token-weighted mean next-token NLL over packed blocks.

Forgetting
    (a) perplexity of held-out old-language text, the same way. Alone it can hide forgetting: text of the same
        genre in another language (Wikipedia summaries) teaches the genre, and old-language perplexity can *fall*
        while the model's behaviour changes.
    (b) drift: ``mean_t KL(p_base(. | x_<t) || p_adapted(. | x_<t))`` over every position of the held-out
        old-language blocks, in nats per token. The base model's log-probabilities are computed once
        (``BaseReference``) and compared in full (the whole vocabulary at every position). For SCALE-Route, the
        model is evaluated in ``eval()`` mode, where it routes: with the cosine rule a token sent to the
        preservation head gets the base model's own logits, so its drift is zero (exactly on CPU, where the
        computation is deterministic); with the learned rule a token sent to the base model gets the base model's
        computation but still attends to earlier tokens that the expansion changed, so its drift is small, not
        zero. The drift is also reported split by routing decision (and, for the cosine rule, the adaptation head's
        drift for comparison).
    (c) answer perplexity: the base model answers fixed English chat prompts greedily once
        (``generate_base_answers``); the adapted model's perplexity of exactly those answer tokens (the prompt and
        chat template are context, not scored) says whether it would still give them.

Every evaluation runs under ``torch.no_grad`` in ``eval()`` mode, in the precision given (``precision``:
``"fp32"``, or ``"bf16"`` autocast over fp32 weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.methods import autocast
from peft_scale.router_fitting import FIRST_TOKENS  # the first tokens of a sequence, where fit_router also reports

IGNORE = -100  # label of a position that is not scored (prompt, padding)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def routing_of(model):
    """SCALE-Route's last routing (``ScaleModel.last_routing``), or ``None`` for a model that does not route."""
    base_model = getattr(model, "base_model", None)
    return getattr(base_model, "last_routing", None)


def token_kl(base_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(base || adapted)`` per position, ``(...)`` from ``(..., vocab)`` inputs, in nats (float32)."""
    adapted = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(adapted, base_logprobs, log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def block_logprobs(model, blocks: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    """Next-token log-probabilities, ``(rows, seq_len, vocab)`` float32 on the model's device."""
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(device)
        with autocast(device, precision):
            logits = model(input_ids=input_ids).logits
        out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


def _sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token NLL of ``targets`` (token ids, or labels with ``IGNORE`` where nothing is scored); every
    position but the first is a target."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    ).item()


ROUTE_THRESHOLDS = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)  # the evaluation-only threshold sweep of SCALE-Route


@torch.no_grad()
def text_measures(
    model,
    blocks: torch.Tensor,
    batch_size: int,
    precision: str,
    base_logprobs: Optional[torch.Tensor] = None,
    route_thresholds: Sequence[float] = (),
    from_position: int = 0,
) -> dict:
    """Perplexity of ``blocks`` and, given the base model's log-probabilities of the same blocks, the drift (b).

    Returns ``perplexity``; with ``base_logprobs`` also ``drift`` (mean KL over every position). For a routing
    model (SCALE-Route in eval mode) also: ``routed_to_preservation`` (share of positions that got the base model's
    logits, or with the learned rule its computation) and, with ``base_logprobs``, ``drift_on_preservation`` /
    ``drift_on_adaptation`` (mean KL over the positions of each routing decision, ``None`` where there are none).

    The cosine rule (two heads) also gives ``perplexity_adaptation_head`` (the adaptation head's perplexity, as if
    nothing were routed), with ``base_logprobs`` ``drift_adaptation_head``, and with ``route_thresholds``
    ``threshold_sweep``: ``{f"{tau:g}": {perplexity, routed_to_preservation[, drift]}}``, what routing at each other
    threshold would have given, from the same two heads' logits (evaluation only: the model is not retrained).
    The learned rule (one computation per token, ``adaptation_logits`` is ``None``) has neither; it gives
    ``routed_to_preservation_first_tokens``, the share over the first ``FIRST_TOKENS`` positions of each block,
    where the router has the least context.

    ``from_position``: every measure counts only the positions from it on (their context still holds the whole
    block before them), and the first ``FIRST_TOKENS`` are counted from it (``switch_measures``).
    """
    model.eval()
    device = model_device(model)
    nll, predicted, kl_sum, kl_count = 0.0, 0, 0.0, 0
    routed = dict.fromkeys(("positions", "kept", "nll_head", "kl_kept", "kl_other", "kl_head", "first", "first_kept"), 0.0)
    sweep = {tau: dict.fromkeys(("kept", "nll", "kl"), 0.0) for tau in route_thresholds}
    saw_routing = two_heads = False
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(device)
        base = None if base_logprobs is None else base_logprobs[start : start + len(input_ids), from_position:]
        before = routing_of(model)
        with autocast(device, precision):
            logits = model(input_ids=input_ids).logits[:, from_position:]
        input_ids = input_ids[:, from_position:]
        nll += _sum_nll(logits, input_ids)
        predicted += input_ids[:, 1:].numel()
        kl = None
        if base is not None:
            kl = token_kl(base, logits)  # (B, T)
            kl_sum += kl.sum().item()
            kl_count += kl.numel()
        routing = routing_of(model)
        if routing is None or routing is before:  # no routing decision made by this forward pass
            continue
        saw_routing = True
        two_heads = routing.adaptation_logits is not None  # the cosine rule; the learned rule has one computation
        mask = routing.to_preservation[:, from_position:]
        routed["positions"] += mask.numel()
        routed["kept"] += int(mask.sum())
        routed["first"] += mask[:, :FIRST_TOKENS].numel()
        routed["first_kept"] += int(mask[:, :FIRST_TOKENS].sum())
        if kl is not None:
            routed["kl_kept"] += kl[mask].sum().item()
            routed["kl_other"] += kl[~mask].sum().item()
        if not two_heads:
            continue
        preservation, adaptation = routing.preservation_logits[:, from_position:], routing.adaptation_logits[:, from_position:]
        routed["nll_head"] += _sum_nll(adaptation, input_ids)
        if kl is not None:
            routed["kl_head"] += token_kl(base, adaptation).sum().item()
        if route_thresholds:
            cosine = F.cosine_similarity(preservation.float(), adaptation.float(), dim=-1)
            for tau, sums in sweep.items():
                keep = cosine >= tau
                at_tau = torch.where(keep.unsqueeze(-1), preservation, adaptation)
                sums["kept"] += int(keep.sum())
                sums["nll"] += _sum_nll(at_tau, input_ids)
                if base is not None:
                    sums["kl"] += token_kl(base, at_tau).sum().item()

    result: dict = {"perplexity": math.exp(nll / predicted)}
    if base_logprobs is not None:
        result["drift"] = kl_sum / kl_count
    if saw_routing:
        n, kept = routed["positions"], routed["kept"]
        result["routed_to_preservation"] = kept / n
        if base_logprobs is not None:
            result["drift_on_preservation"] = routed["kl_kept"] / kept if kept else None
            result["drift_on_adaptation"] = routed["kl_other"] / (n - kept) if n - kept else None
        if not two_heads:
            result["routed_to_preservation_first_tokens"] = routed["first_kept"] / routed["first"]
            return result
        result["perplexity_adaptation_head"] = math.exp(routed["nll_head"] / predicted)
        if base_logprobs is not None:
            result["drift_adaptation_head"] = routed["kl_head"] / n
        if route_thresholds:
            result["threshold_sweep"] = {  # keyed by the threshold as text, as JSON will have it
                f"{tau:g}": {
                    "routed_to_preservation": sums["kept"] / n,
                    "perplexity": math.exp(sums["nll"] / predicted),
                    **({"drift": sums["kl"] / n} if base_logprobs is not None else {}),
                }
                for tau, sums in sweep.items()
            }
    return result


# what switch_measures gives of text_measures' routing numbers, for the learned rule
SWITCH_ROUTING = (
    "routed_to_preservation", "routed_to_preservation_first_tokens", "drift_on_preservation", "drift_on_adaptation"
)


@torch.no_grad()
def switch_measures(
    model, blocks: torch.Tensor, switch_at: int, base_logprobs: torch.Tensor, batch_size: int, precision: str
) -> dict:
    """The drift (b) on text that switches from the new language to the old one at position ``switch_at`` of each
    block (``ExperimentText.switch_eval``), measured on the old-language part only (the positions from
    ``switch_at`` on, whose context holds the new-language passage before them).

    Returns ``drift`` (mean KL to the base model there); for a learned-route model also ``routed_to_preservation``
    (share of those positions computed as the base model), ``routed_to_preservation_first_tokens`` (over the
    ``FIRST_TOKENS`` positions right after the switch, where a smoothed router still carries the new passage's
    average), and ``drift_on_preservation`` / ``drift_on_adaptation`` (the mean KL over the positions of each
    decision, ``None`` where there are none). A token routed to the base model gets its MLPs' base output, but its
    attention reads the new passage's keys and values, which the expansion changed: ``drift_on_preservation`` is
    what that costs (on single-language old text it is the drift of the few old tokens after a misrouted one).
    """
    result = text_measures(model, blocks, batch_size, precision, base_logprobs, from_position=switch_at)
    # the learned rule's per-token decisions (text_measures gives routed_to_preservation_first_tokens for it alone)
    learned = "routed_to_preservation_first_tokens" in result
    return {key: result[key] for key in ("drift", *(SWITCH_ROUTING if learned else ()))}


# ------------------------------------------------------------------------------------------- (c) chat answers


@dataclass
class ChatAnswer:
    """One prompt through the chat template (``prompt_ids``) and the base model's greedy answer to it
    (``answer_ids``, up to and including its end-of-turn token when it stopped before the length limit)."""

    prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of one user turn and the assistant's opening, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Forgetting measure (c) needs a chat model: the tokenizer has no chat template. Use an instruct model, "
            "or set tokenizer.chat_template."
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds the special tokens


@torch.no_grad()
def generate_base_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, precision: str
) -> list[ChatAnswer]:
    """The base model's greedy answers, batched with left padding (the attention mask hides the padding)."""
    model.eval()
    device = model_device(model)
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with autocast(device, precision):
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stop,
            )
        for prompt, ids, row in zip(prompts[start : start + batch_size], batch, out[:, width:].tolist()):
            answer = row[: row.index(stop) + 1] if stop in row else row
            answers.append(ChatAnswer(prompt=prompt, prompt_ids=ids, answer_ids=answer))
    if any(not a.answer_ids for a in answers):
        raise RuntimeError("The base model gave an empty answer to a prompt; measure (c) has nothing to score.")
    return answers


@torch.no_grad()
def answer_measures(model, answers: Sequence[ChatAnswer], batch_size: int, precision: str, pad_id: int) -> dict:
    """``perplexity``: ``exp`` of the mean NLL of the answer tokens (only those) given prompt and chat template,
    right-padded; for a routing model also ``routed_to_preservation``, the share of the positions that predict an
    answer token that got the base model's logits (or computation), and for the cosine rule
    ``perplexity_adaptation_head``, the same perplexity for its adaptation head alone."""
    model.eval()
    device = model_device(model)
    nll, head_nll, scored, saw_routing, two_heads, kept = 0.0, 0.0, 0, False, False, 0
    for start in range(0, len(answers), batch_size):
        batch = answers[start : start + batch_size]
        rows = [a.prompt_ids + a.answer_ids for a in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        labels = torch.tensor(
            [[IGNORE] * len(a.prompt_ids) + a.answer_ids + [IGNORE] * (width - len(r)) for a, r in zip(batch, rows)],
            device=device,
        )
        before = routing_of(model)
        with autocast(device, precision):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        nll += _sum_nll(logits, labels)
        scored += int((labels[:, 1:] != IGNORE).sum())
        routing = routing_of(model)
        if routing is not None and routing is not before:
            saw_routing = True
            kept += int(routing.to_preservation[:, :-1][labels[:, 1:] != IGNORE].sum())
            two_heads = routing.adaptation_logits is not None
            if two_heads:
                head_nll += _sum_nll(routing.adaptation_logits, labels)
    result = {"perplexity": math.exp(nll / scored)}
    if saw_routing:
        result["routed_to_preservation"] = kept / scored
        if two_heads:
            result["perplexity_adaptation_head"] = math.exp(head_nll / scored)
    return result
