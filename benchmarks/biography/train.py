"""Encoding, the training loop and QA evaluation of the biography experiment.

Why a short manual loop and not ``transformers.Trainer``: a step here is a few milliseconds of compute on a
sub-million-parameter model, the experiment evaluates two custom metrics every few steps on the model in eval mode
(SCALE-Route routes only in eval), and it runs dozens of short trainings in a row. Trainer's per-step machinery
(callbacks, logging, accelerate wrapping, the evaluation loop built for loss-style metrics) costs more than the
step itself at this size and would still need a custom callback for the metrics. The loop keeps the standard
pieces: ``transformers.get_scheduler`` for the learning rate, ``DataCollatorForSeq2Seq`` for padding (inputs with
the pad token, labels with -100), ``torch.optim.AdamW``, ``torch.autocast`` for bf16.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from datasets import Dataset, concatenate_datasets
from transformers import DataCollatorForSeq2Seq, get_scheduler

from .data import QAPair

IGNORE = -100
ROUTE_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # the routing diagnostics' threshold sweep


# ------------------------------------------------------------------------------------------------- encoding


def encode_biography(tokenizer, text: str) -> dict:
    """``<s> words </s>``, loss on every token."""
    ids = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(text.split()), tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def encode_qa(tokenizer, pair: QAPair) -> dict:
    """``<s> question Answer : answer </s>``, loss on the answer and ``</s>`` only (supervised fine-tuning)."""
    prompt = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(pair.prompt.split())]
    answer = [*tokenizer.convert_tokens_to_ids(pair.answer.split()), tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def examples_dataset(tokenizer, texts: list[str] = (), pairs: list[QAPair] = ()) -> Dataset:
    rows = [encode_biography(tokenizer, t) for t in texts] + [encode_qa(tokenizer, p) for p in pairs]
    return Dataset.from_list(rows)


def repeat_shuffled(dataset: Dataset, length: int, seed: int) -> Dataset:
    """The first ``length`` examples of a stream of epochs of ``dataset``, each epoch shuffled with its own seed."""
    epochs = math.ceil(length / len(dataset))
    stream = concatenate_datasets([dataset.shuffle(seed=seed + epoch) for epoch in range(epochs)])
    return stream.select(range(length))


def batches(stream: Dataset, batch_size: int, collator) -> Iterator[dict]:
    """Consecutive batches of ``stream`` (its order is the training order), padded by ``collator``."""
    for start in range(0, len(stream) - batch_size + 1, batch_size):
        rows = stream[start : start + batch_size]
        yield collator([{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])])


def make_collator(tokenizer):
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class QAEvalSet:
    """Every QA pair of one task as padded tensors, with where each answer starts and how long it is."""

    input_ids: torch.Tensor  # (N, T) padded with the pad id
    attention_mask: torch.Tensor  # (N, T)
    answer_start: torch.Tensor  # (N,) index of the first answer token
    answer_length: torch.Tensor  # (N,) answer tokens (without </s>)
    roles: Optional[torch.Tensor] = None  # (N, T) the role of each token (TOKEN_ROLES; 0: padding)

    @classmethod
    def build(cls, tokenizer, pairs: list[QAPair]) -> "QAEvalSet":
        rows = [encode_qa(tokenizer, p) for p in pairs]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        roles = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, pair) in enumerate(zip(rows, pairs)):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
            roles[i, : len(row["input_ids"])] = torch.tensor(token_roles(pair))
        start = torch.tensor([sum(label == IGNORE for label in r["labels"]) for r in rows])  # the prompt's length
        length = torch.tensor([len(p.answer.split()) for p in pairs])
        return cls(ids, mask, start, length, roles)


# What each token of an encoded QA pair is (``token_roles``): the learned router's diagnostics are per role.
TOKEN_ROLES = ("question", "first_name", "last_name", "answer_prefix", "answer", "eos")


def token_roles(pair: QAPair) -> list[int]:
    """Per token of ``encode_qa(pair)``, its role's index in ``TOKEN_ROLES`` plus 1 (0 is padding): ``<s>`` and the
    question's template words, the person's first name and last name, ``? Answer :`` (the last of which predicts
    the first answer token), the answer's tokens, ``</s>``."""
    words, name = pair.prompt.split(), pair.person.split()
    at = next(i for i in range(len(words)) if words[i : i + len(name)] == name)
    prompt = ["question"] * len(words)
    prompt[at] = "first_name"
    for i in range(at + 1, at + len(name)):
        prompt[i] = "last_name"
    for i in range(len(words) - 3, len(words)):  # every question ends "{name} ? Answer :"
        prompt[i] = "answer_prefix"
    names = ["question", *prompt, *["answer"] * len(pair.answer.split()), "eos"]
    return [TOKEN_ROLES.index(role) + 1 for role in names]


@torch.no_grad()
def qa_accuracy(model, eval_set: QAEvalSet, device, autocast, chunk: int = 512, routing: Optional[Callable] = None) -> dict:
    """First-token accuracy and exact match of the answers, teacher-forced (argmax at every answer position).

    Teacher-forced argmax at every answer position is exactly greedy decoding's exact match: greedy decoding
    writes the whole answer iff every answer token is the argmax given the correct prefix. One forward per chunk,
    no generation loop. The model must already be in the mode it is evaluated in (eval: SCALE-Route routes).

    ``routing`` (SCALE-Route): a function returning the last forward's ``RouteResult``; adds the share of answer
    tokens routed to the preservation head (``to_preservation``), the first-token accuracy of each head alone
    (``preservation_first_token``, ``adaptation_first_token``), the mean cosine of the two heads' logits at the
    first answer position (``answer_cosine``), and the first-token accuracy the cosine rule would give at other
    thresholds (``first_token_tau_0.9``, ...): the rule is a function of the two heads' logits, so a threshold sweep
    needs no retraining. Together they say whether routing, or the adaptation path, is where accuracy is lost.

    With the learned rule (the route has no per-head logits) it adds instead: ``to_preservation`` as above (answer
    tokens routed to the base model), ``first_answer_to_base`` (questions whose first answer token is predicted by
    the base model's computation), ``first_token_right_at_base`` / ``first_token_right_at_expansion`` (questions
    whose first answer token is right and routed there; the two sum to ``first_token``), ``sequences_all_base``
    (questions with every token routed to the base model: computed exactly as the base model computes them), and
    ``to_base_<role>`` for every role of ``TOKEN_ROLES`` (the share of those tokens routed to the base model).
    """
    hits = {"first_token": 0, "exact_match": 0}
    learned = None  # whether the route is the learned rule's (known after the first forward)
    total, answer_tokens = eval_set.input_ids.shape[0], eval_set.answer_length.sum().item()
    role_tokens = {}
    if eval_set.roles is not None:
        role_tokens = {role: (eval_set.roles == index + 1).sum().item() for index, role in enumerate(TOKEN_ROLES)}
    for begin in range(0, total, chunk):
        ids = eval_set.input_ids[begin : begin + chunk].to(device)
        mask = eval_set.attention_mask[begin : begin + chunk].to(device)
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
        start = eval_set.answer_start[begin : begin + chunk].to(device)
        length = eval_set.answer_length[begin : begin + chunk].to(device)
        first_answer = ids.gather(1, start[:, None])  # (B, 1)

        def first_token_hits(scores):  # position start - 1 predicts the first answer token
            return (scores[:, :-1].argmax(-1).gather(1, (start - 1)[:, None]) == first_answer).sum().item()

        correct = logits[:, :-1].argmax(-1) == ids[:, 1:]  # (B, T-1): the prediction of token t+1 is right
        positions = torch.arange(correct.shape[1], device=device)
        in_answer = (positions >= start[:, None] - 1) & (positions < (start + length)[:, None] - 1)
        hits["first_token"] += first_token_hits(logits)
        hits["exact_match"] += (correct | ~in_answer).all(dim=1).sum().item()
        if routing is not None:
            route = routing()
            if learned is None:
                learned = route.preservation_logits is None
                hits["to_preservation"] = 0
                if learned:
                    hits.update(first_answer_to_base=0, sequences_all_base=0, first_token_right_at_base=0,
                                first_token_right_at_expansion=0)
                    hits.update({f"to_base_{role}": 0 for role in role_tokens})
                else:
                    hits.update(preservation_first_token=0, adaptation_first_token=0, answer_cosine=0.0)
                    hits.update({f"first_token_tau_{tau:g}": 0 for tau in ROUTE_THRESHOLDS})
            hits["to_preservation"] += (route.to_preservation[:, :-1] & in_answer).sum().item()
            if learned:  # the learned rule: where the base model's computation went, per token role
                to_base = route.to_preservation
                rows = torch.arange(ids.shape[0], device=device)
                at_first = to_base[rows, start - 1]  # the position that predicts the first answer token
                right = logits[rows, start - 1].argmax(-1) == first_answer[:, 0]
                hits["first_answer_to_base"] += at_first.sum().item()
                hits["first_token_right_at_base"] += (right & at_first).sum().item()
                hits["first_token_right_at_expansion"] += (right & ~at_first).sum().item()
                hits["sequences_all_base"] += (to_base | ~mask.bool()).all(dim=1).sum().item()
                if eval_set.roles is not None:
                    roles = eval_set.roles[begin : begin + chunk].to(device)
                    for index, role in enumerate(TOKEN_ROLES):
                        hits[f"to_base_{role}"] += (to_base & (roles == index + 1)).sum().item()
                continue
            hits["preservation_first_token"] += first_token_hits(route.preservation_logits)
            hits["adaptation_first_token"] += first_token_hits(route.adaptation_logits)
            rows = torch.arange(ids.shape[0], device=device)
            preservation = route.preservation_logits[rows, start - 1].float()  # (B, V) at the first answer position
            adaptation = route.adaptation_logits[rows, start - 1].float()
            cosine = torch.nn.functional.cosine_similarity(preservation, adaptation, dim=-1)
            hits["answer_cosine"] += cosine.sum().item()
            for tau in ROUTE_THRESHOLDS:
                routed = torch.where(cosine >= tau, preservation.argmax(-1), adaptation.argmax(-1))
                hits[f"first_token_tau_{tau:g}"] += (routed == first_answer[:, 0]).sum().item()

    def share(key, value):
        if key == "to_preservation":
            return value / answer_tokens
        if key.startswith("to_base_"):
            return value / role_tokens[key[len("to_base_"):]]
        return value / total

    return {key: share(key, value) for key, value in hits.items()}


# -------------------------------------------------------------------------------------------------- training


def train(
    model,
    stream: Dataset,
    *,
    collator,
    batch_size: int,
    lr: float,
    device,
    autocast,
    warmup_fraction: float = 0.05,
    scheduler: str = "cosine",
    eval_every: int = 0,
    evaluate: Optional[Callable[[], dict]] = None,
    param_groups: Optional[list] = None,
    betas: tuple = (0.9, 0.98),
    max_grad_norm: Optional[float] = None,
) -> dict:
    """Train ``model`` on ``stream`` in order, one AdamW step per batch; evaluate every ``eval_every`` steps.
    ``param_groups``: AdamW's parameter groups (each with its own ``lr``); default one group of every trainable
    parameter at ``lr``. ``max_grad_norm``: clip the gradients' total norm to it before each step (the ``Trainer``
    clips at 1.0); ``None``: no clipping.

    Returns ``{"curve": {"step": [...], <metric>: [...]}, "steps", "train_s", "step_s", "final_loss"}``; the curve
    has the point before the first step (step 0) and after the last. ``train_s`` excludes evaluation time.
    """
    steps = len(stream) // batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = param_groups if param_groups is not None else trainable
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    schedule = get_scheduler(
        scheduler, optimizer, num_warmup_steps=int(warmup_fraction * steps), num_training_steps=steps
    )
    curve: dict[str, list] = {"step": []}

    def record(step: int) -> None:
        if evaluate is None:
            return
        model.eval()
        metrics = evaluate()
        model.train()
        curve["step"].append(step)
        for key, value in metrics.items():
            curve.setdefault(key, []).append(value)

    model.train()
    record(0)
    train_s, loss = 0.0, float("nan")
    for step, batch in enumerate(batches(stream, batch_size, collator), start=1):
        begin = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - begin
        if eval_every and (step % eval_every == 0) and step != steps:
            record(step)
    record(steps)
    model.eval()
    return {
        "curve": curve,
        "steps": steps,
        "train_s": train_s,
        "step_s": train_s / max(steps, 1),
        "final_loss": float(loss.item()) if torch.is_tensor(loss) else loss,
    }
