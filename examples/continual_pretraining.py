"""Continual pre-training with SCALE and the Hugging Face ``Trainer``: any causal LM, any text, replay and MER.

Teaches a model new text (``--new-files``) while measuring what it forgets of old text (``--old-files``):

- the model is widened with SCALE (``--ffn-expansion``; ``--hidden-expansion`` for full width, with
  ``--variant``) and only the new weights train;
- ``--replay f`` mixes a fraction ``f`` of old-text blocks into the training stream (``datasets``'
  ``interleave_datasets``, see ``text_blocks.replay_mix``), the replay of Abbes et al. (arXiv 2508.01908);
- ``--mer k gamma`` adds ``peft_scale.MERCallback``: every ``k`` steps the adapter is pulled back toward the start of
  the window, ``theta <- theta_start + gamma (theta - theta_start)`` (efficient MER, same paper);
- the Trainer evaluates held-out old and new text (``eval_dataset={"old": ..., "new": ...}``) at the start and
  every ``--eval-steps``; ``ForgettingLearningCallback`` adds their perplexities to the logs
  (``eval_old_perplexity``: forgetting, ``eval_new_perplexity``: learning) with the change since the first
  evaluation.

Defaults: the bundled SmolLM2-135M-Instruct, Spanish Wikipedia summaries as new text and English ones as old text
(``examples/bundled.py``). ``--tiny`` runs the same code in seconds on a tiny random Llama and a few bundled
summaries. ``--output-dir`` gets the adapter and its model card. Under ``torchrun``/``accelerate launch`` the
Trainer runs DDP; ``accelerate launch --config_file examples/configs/fsdp2.yaml`` runs FSDP2, and
``--deepspeed examples/configs/deepspeed_zero2.json`` DeepSpeed ZeRO-2 (not run here; see docs/multi-process.md).

    python examples/continual_pretraining.py --replay 0.25 --mer 5 0.5 --output-dir out/cpt
    python examples/continual_pretraining.py --model HuggingFaceTB/SmolLM2-360M --new-files my_corpus/*.txt \\
        --old-files general/*.txt --replay 0.1
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

import peft_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled import documents_or_summaries  # noqa: E402
from causal_lm import (  # noqa: E402
    add_common_arguments,
    load_causal_lm,
    needs_router,
    parse_args_with_tiny_defaults,
    scale_config_from_args,
)
from text_blocks import SAMPLE_BY, first_blocks, packed_blocks, replay_mix, split_texts  # noqa: E402

TINY_DEFAULTS = dict(
    max_steps=4, batch_size=2, seq_len=32, train_texts=24, eval_texts=6, eval_blocks=2, eval_steps=2, ffn_expansion=16
)


class ForgettingLearningCallback(TrainerCallback):
    """Adds the perplexity of every evaluation set to the Trainer's logs, and its change since the first evaluation.

    For each ``eval_<name>_loss`` in a log entry (the Trainer's mean next-token loss on the eval set ``<name>``),
    it adds ``eval_<name>_perplexity = exp(loss)`` and ``eval_<name>_perplexity_change`` (relative to the first
    evaluation, e.g. at step 0 with ``eval_on_start=True``). With ``eval_dataset={"old": ..., "new": ...}``, old
    perplexity going up is forgetting and new perplexity going down is learning. The values go into
    ``state.log_history`` and into the ``logs`` handed to the callbacks after this one (the console printer; put
    the callback first in ``Trainer.callback_handler`` for reporting integrations to see them too).
    """

    def __init__(self):
        self.first: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        added = {}
        for key, loss in logs.items():
            if key.startswith("eval_") and key.endswith("_loss"):
                name = key[: -len("_loss")]
                perplexity = math.exp(loss)
                self.first.setdefault(name, perplexity)
                added[f"{name}_perplexity"] = perplexity
                added[f"{name}_perplexity_change"] = perplexity / self.first[name] - 1
        logs.update(added)
        # Trainer.log stored a copy of the entry before the callbacks ran: complete that copy too.
        if added and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train = add_common_arguments(parser, max_steps=40, tiny_defaults=TINY_DEFAULTS)
    train.add_argument("--eval-steps", type=int, default=10, help="evaluate old and new text every this many steps")
    train.add_argument(
        "--deepspeed", default=None, help="DeepSpeed config for the Trainer (examples/configs/deepspeed_zero2.json)"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--new-files", nargs="+", default=None, help="new text to learn (default: Spanish summaries)")
    data.add_argument(
        "--old-files", nargs="+", default=None, help="old text: replayed and evaluated (default: English)"
    )
    data.add_argument("--sample-by", choices=SAMPLE_BY, default="paragraph", help="what one document is in the files")
    data.add_argument("--train-texts", type=int, default=1000, help="new documents to train on")
    data.add_argument(
        "--replay-texts",
        type=int,
        default=None,
        help="old documents to replay from (default: as many as --train-texts)",
    )
    data.add_argument("--eval-texts", type=int, default=200, help="held-out documents per side, never trained on")
    data.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per side that are evaluated")
    data.add_argument("--seq-len", type=int, default=128, help="tokens per packed block")
    cl = parser.add_argument_group("continual learning")
    cl.add_argument("--replay", type=float, default=0.0, help="fraction of training blocks drawn from the old text")
    cl.add_argument("--mer", nargs=2, metavar=("K", "GAMMA"), default=None, help="MERCallback(k=K, gamma=GAMMA)")
    args = parse_args_with_tiny_defaults(parser, argv, TINY_DEFAULTS)
    if args.mer is not None:
        args.mer = dict(k=int(args.mer[0]), gamma=float(args.mer[1]))
    return args


def build_datasets(args, tokenizer):
    """(training blocks, {"old": held-out old blocks, "new": held-out new blocks}, the new-text training blocks)."""
    new_held_out, new_train = split_texts(
        documents_or_summaries(args.new_files, "es", args.sample_by), args.eval_texts, args.train_texts, args.seed
    )
    old_texts = documents_or_summaries(args.old_files, "en", args.sample_by)
    replay_texts = args.train_texts if args.replay_texts is None else args.replay_texts
    old_held_out, old_pool = split_texts(old_texts, args.eval_texts, replay_texts if args.replay else 0, args.seed)
    new_blocks = train_blocks = packed_blocks(new_train, tokenizer, args.seq_len)
    if args.replay:
        train_blocks = replay_mix(
            train_blocks, packed_blocks(old_pool, tokenizer, args.seq_len), args.replay, args.seed
        )
    eval_blocks = {
        "old": first_blocks(packed_blocks(old_held_out, tokenizer, args.seq_len), args.eval_blocks, "old"),
        "new": first_blocks(packed_blocks(new_held_out, tokenizer, args.seq_len), args.eval_blocks, "new"),
    }
    return train_blocks, eval_blocks, new_blocks


def summary(log_history) -> str:
    lines = [f"{'step':>6} {'old ppl (forgetting)':>22} {'new ppl (learning)':>20}"]
    for entry in log_history:
        if "eval_old_perplexity" in entry:
            new = next(
                (
                    e["eval_new_perplexity"]
                    for e in log_history
                    if e.get("step") == entry["step"] and "eval_new_perplexity" in e
                ),
                float("nan"),
            )
            lines.append(f"{entry['step']:>6} {entry['eval_old_perplexity']:>22.2f} {new:>20.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    datasets.disable_progress_bars()
    model, tokenizer = load_causal_lm(args.model, tiny=args.tiny)
    train_blocks, eval_blocks, new_blocks = build_datasets(args, tokenizer)
    print(f"Training stream: {len(train_blocks)} blocks of {args.seq_len} tokens (replay fraction {args.replay})")
    config = scale_config_from_args(args)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    callbacks = [ForgettingLearningCallback()]
    if args.mer is not None:
        callbacks.append(peft_scale.MERCallback(**args.mer))
    if needs_router(config):
        # The router's new side is the new text only (the training stream may mix in replayed old text); its old
        # side is sampled from the base model.
        callbacks.append(peft_scale.RouterFitCallback(new_data=new_blocks.select(range(min(64, len(new_blocks))))))
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=str(args.output_dir or scratch),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=0.0,
            warmup_steps=0.1,
            lr_scheduler_type="cosine",
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            eval_on_start=True,
            logging_steps=args.eval_steps,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            deepspeed=args.deepspeed,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=default_data_collator,
            callbacks=callbacks,
        )
        trainer.train()
        if args.output_dir is not None:
            trainer.save_model(str(args.output_dir))  # the adapter and its model card, on the main process
    if trainer.is_world_process_zero():
        print("\nHeld-out perplexity (old text: forgetting; new text: learning)")
        print(summary(trainer.state.log_history))
        if args.output_dir is not None:
            print(f"Adapter saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
