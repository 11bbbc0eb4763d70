"""Supervised fine-tuning with TRL's ``SFTTrainer`` and a SCALE adapter (``peft_config=ScaleConfig(...)``).

TRL wraps the model itself when it is given a ``peft_config``; any PEFT config works, SCALE included (TRL's fused
LM head needs the LM head to stay a plain module, which SCALE keeps in full width too). The data are chat
conversations in TRL's prompt-completion form, so the loss covers only the assistant's answers: by default, a
question about a bundled Spanish Wikipedia article ("¿Qué es ABBA?") answered by its summary.

    python examples/sft_trl.py --output-dir out/sft            # the bundled SmolLM2-135M-Instruct
    python examples/sft_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --hidden-expansion 128 --variant preserve
    python examples/sft_trl.py --tiny                          # seconds: a tiny random Llama

Without ``--output-dir`` the adapter is not kept. After training, the model answers one held-out question.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import peft_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled import wiki_articles  # noqa: E402
from causal_lm import (  # noqa: E402
    add_common_arguments,
    load_causal_lm,
    needs_router,
    parse_args_with_tiny_defaults,
    scale_config_from_args,
)
from text_blocks import split_texts  # noqa: E402

QUESTION = {"es": "¿Qué es {title}?", "en": "What is {title}?", "fr": "Qu'est-ce que {title} ?"}
TINY_DEFAULTS = dict(max_steps=3, batch_size=2, train_examples=12, max_length=64, ffn_expansion=16, new_tokens=8)


def conversations(language: str, count: int, seed: int) -> tuple[Dataset, list[dict]]:
    """(training set, held-out examples): questions about bundled articles, answered by their summaries."""
    articles = [
        {
            "prompt": [{"role": "user", "content": QUESTION[language].format(title=title)}],
            "completion": [{"role": "assistant", "content": summary}],
        }
        for title, summary in wiki_articles(language)
    ]
    held_out, train = split_texts(articles, 1, count, seed)
    return Dataset.from_list(train), held_out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train = add_common_arguments(parser, max_steps=30, tiny_defaults=TINY_DEFAULTS)
    train.add_argument("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    train.add_argument("--new-tokens", type=int, default=48, help="tokens generated for the held-out question")
    data = parser.add_argument_group("data")
    data.add_argument("--language", choices=sorted(QUESTION), default="es", help="bundled articles to learn")
    data.add_argument("--train-examples", type=int, default=500)
    args = parse_args_with_tiny_defaults(parser, argv, TINY_DEFAULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    datasets.disable_progress_bars()
    model, tokenizer = load_causal_lm(args.model, tiny=args.tiny)
    train, held_out = conversations(args.language, args.train_examples, args.seed)
    scale_config = scale_config_from_args(args)
    with tempfile.TemporaryDirectory() as scratch:
        sft_config = SFTConfig(
            output_dir=str(args.output_dir or scratch),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
            max_length=args.max_length,
            logging_steps=max(1, args.max_steps // 10),
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # fp32 on CPU
        )
        # a learned router is fitted on the first training batches, against the base model's own samples
        callbacks = [peft_scale.RouterFitCallback()] if needs_router(scale_config) else []
        trainer = SFTTrainer(
            model=model, args=sft_config, train_dataset=train, processing_class=tokenizer, peft_config=scale_config,
            callbacks=callbacks,
        )
        trainer.model.print_trainable_parameters()
        trainer.train()
        if args.output_dir is not None:
            trainer.save_model(str(args.output_dir))

    model = trainer.model.eval()
    prompt = tokenizer.apply_chat_template(
        held_out[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nQ: {held_out[0]['prompt'][0]['content']}\nA: {answer}")
    if args.output_dir is not None:
        print(f"Adapter saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
