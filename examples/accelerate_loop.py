"""A training loop of your own with 🤗 Accelerate and a SCALE adapter: ``Accelerator``, ``prepare``, ``backward``,
gradient accumulation, and saving the adapter from the main process.

The same script runs on one CPU, one GPU, or many processes (``accelerate launch --num_processes N`` or
``torchrun --nproc_per_node N``): ``prepare`` wraps the model for DDP and shards the data loader, the loss is
averaged across processes for logging, and only the main process writes the adapter. By default it continues the
pre-training of the bundled SmolLM2-135M on Spanish Wikipedia summaries and reports held-out Spanish loss before and
after.

    python examples/accelerate_loop.py --output-dir out/loop
    accelerate launch --num_processes 2 examples/accelerate_loop.py --tiny
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_cosine_schedule_with_warmup, set_seed

import peft_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled import wiki_summaries  # noqa: E402
from causal_lm import (  # noqa: E402
    add_common_arguments,
    load_causal_lm,
    needs_router,
    parse_args_with_tiny_defaults,
    scale_config_from_args,
)
from text_blocks import first_blocks, packed_blocks, split_texts  # noqa: E402

TINY_DEFAULTS = dict(
    max_steps=4, batch_size=2, seq_len=32, train_texts=24, eval_texts=6, eval_blocks=2, ffn_expansion=16
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train = add_common_arguments(parser, max_steps=40, tiny_defaults=TINY_DEFAULTS)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    data = parser.add_argument_group("data")
    data.add_argument("--language", choices=("es", "en", "fr"), default="es", help="bundled summaries to train on")
    data.add_argument("--train-texts", type=int, default=1000)
    data.add_argument("--eval-texts", type=int, default=200)
    data.add_argument("--eval-blocks", type=int, default=16)
    data.add_argument("--seq-len", type=int, default=128)
    args = parse_args_with_tiny_defaults(parser, argv, TINY_DEFAULTS)
    return args


@torch.no_grad()
def held_out_loss(model, loader, accelerator: Accelerator) -> float:
    """Mean next-token loss over the (sharded) held-out loader, averaged over every block of every process."""
    model.eval()
    losses = []
    for batch in loader:
        loss = model(**batch).loss  # mean over this batch's tokens; all blocks have the same length
        losses.append(accelerator.gather_for_metrics(loss.repeat(batch["input_ids"].shape[0])))
    model.train()
    return torch.cat(losses).mean().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    datasets.disable_progress_bars()
    model, tokenizer = load_causal_lm(args.model, tiny=args.tiny)
    held_out, train = split_texts(wiki_summaries(args.language), args.eval_texts, args.train_texts, args.seed)
    train_blocks = packed_blocks(train, tokenizer, args.seq_len).with_format("torch")
    eval_blocks = first_blocks(packed_blocks(held_out, tokenizer, args.seq_len), args.eval_blocks, args.language)
    train_loader = DataLoader(
        train_blocks, batch_size=args.batch_size, shuffle=True, collate_fn=default_data_collator, drop_last=True
    )
    eval_loader = DataLoader(
        eval_blocks.with_format("torch"), batch_size=args.batch_size, collate_fn=default_data_collator
    )

    config = scale_config_from_args(args)
    model = get_peft_model(model, config)
    if needs_router(config):  # before training: the router reads frozen features, so it is fitted once
        print(peft_scale.fit_router(model, train_blocks.select(range(min(64, len(train_blocks)))), old_data=None))
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.max_steps // 10), args.max_steps)
    # prepare: DDP wrapping (several processes), device placement, data sharding, and scheduler stepping that
    # follows the optimizer's real steps under gradient accumulation.
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    before = held_out_loss(model, eval_loader, accelerator)
    step = 0
    model.train()
    while step < args.max_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:  # one optimizer step done
                step += 1
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                accelerator.print(f"step {step:>4}  loss {mean_loss:.4f}")
                if step == args.max_steps:
                    break
    after = held_out_loss(model, eval_loader, accelerator)
    accelerator.print(
        f"\nHeld-out {args.language} loss: {before:.4f} -> {after:.4f} "
        f"(perplexity {math.exp(before):.2f} -> {math.exp(after):.2f}), {accelerator.num_processes} process(es)"
    )

    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        accelerator.unwrap_model(model).save_pretrained(
            args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
        accelerator.print(f"Adapter saved to {args.output_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
