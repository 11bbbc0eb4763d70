"""Experiment 1 of issue 5: forgetting vs learning on synthetic biographies, for every compared method.

The SCALE paper's protocol (after Physics of Language Models 3.1), at CPU scale::

    stage 1  pre-train a small Llama from scratch on biographies of the Task-0 people
    stage 2  QA fine-tuning on Task-0 (every Task-0 person and attribute), all weights
    stage 3  for every method (benchmarks/methods.py) and learning rate: from the stage-2 model, learn the unseen
             Task-1 people's QA pairs (``--task1-bios``: their biographies too); evaluate every ``eval_every`` steps
             Task-0 QA (retention) and Task-1 QA (acquisition), first-token accuracy and exact match

Four replay rows mix 25% old data into the same number of steps with ``methods.mix_with_replay``: Task-0 QA (the
stage-2 data; ``full+replay``, ``scale_route+replay``) or the base model's own samples (``full+replay_samples``;
``full+replay_format_samples``: those drawn in the Task-1 format).
Every row trains the same number of steps on batches of the same size.

Eight learned-route rows (``methods.ROUTED_METHODS``: ``scale_ffn_routed``, FFN mode; ``scale_routed``, full width)
fit the router (``methods.fit_method_router``, ``peft_scale.fit_router``) after ``prepare_method`` and before
stage 3, with an MLP router of ``Settings.router_hidden`` (256) hidden units reading the stream entering layer
``preserve_layers``, and otherwise peft-scale 0.1.0's router settings (``methods.ROUTER_0_1_0``: these rows were
measured before 0.2). The new side is the Task-1 training sequences; the old side is the Task-0 QA (the rows without
a suffix) or, for the ``+samples`` rows, ``Settings.router_samples`` samples of the base model (the stage-2 model),
each started from the beginning of a Task-1 question (``<s>`` and its first word) and as long as the longest
Task-1 QA sequence. ``full+replay_samples`` replays exactly those samples (checked: ``samples_equal_replay_samples``
in each ``+samples`` run's router report). The ``+format`` rows draw their old side in the Task-1 QA's format
(``BaseModelSamples(in_new_data_format=True)``, ``Settings.router_format_samples`` draws: the question words copied, the
names and answers drawn from the base model); ``full+replay_format_samples`` replays the same draws (checked the same
way).

Two rows run the README's first routed example as written (``README_RECIPE_ROWS``): ``scale_ffn_routed_defaults``
(old side the Task-0 QA) and ``scale_ffn_routed_defaults+samples`` (``old_data=None``: ``fit_router`` draws the base
model's samples itself), with ``RouterConfig()`` and nothing set, at the README's learning rate only, and its
optimizer and schedule (``README_RECIPE``); their sizes are this benchmark's (``Settings.sizes``).
``scale_ffn_routed_defaults+fitted`` sets one field, ``RouterConfig(calibrate_on="fitted")``: what docs/router.md
says to set when the old data is exactly what must be kept (here the Task-0 QA, a set of facts).

Choosing the learning rate: each method runs a small sweep (``Settings.lr_grid``); the table reports, per method,
the learning rate with the highest final Task-1 first-token accuracy (ties within 0.005 go to the higher final
Task-0 accuracy), i.e. every method at its best *learning*, and shows what it forgets there. results.json keeps
the whole sweep.

Run from the repository root::

    python -m benchmarks.biography.run                      # the full run (2 workers): 29 min on 2 busy CPU cores
                                                            # before the 15 learned-router runs were added
    python -m benchmarks.biography.run --device cuda        # the same on a GPU
    python -m benchmarks.biography.run --quick              # a smoke run (CI, seconds), results mean nothing
    python -m benchmarks.biography.run --methods full scale_route --lr scale_route=0.001 --size preserve_layers=4
    python -m benchmarks.biography.run --render benchmarks/results/biography/results.json --notes findings.md
    python -m benchmarks.biography.run --methods scale_routed full+replay_samples --merge --cache-dir CACHE
                                                            # add rows to an existing results.json (same stage 2)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.methods import (  # noqa: E402
    METHODS,
    README_ROUTED_LR,
    ROUTER_0_1_0,
    MethodSizes,
    autocast,
    fit_method_router,
    mix_with_replay,
    prepare_method,
    trainable_parameters,
)
from peft_scale import BaseModelSamples, scale_optimizer_param_groups  # noqa: E402
from benchmarks.biography.data import biographies, build_tokenizer, make_tasks, qa_pairs  # noqa: E402
from benchmarks.biography.train import (  # noqa: E402
    IGNORE,
    QAEvalSet,
    encode_qa,
    examples_dataset,
    make_collator,
    qa_accuracy,
    repeat_shuffled,
    train,
)

DEFAULT_OUTPUT_DIR = REPO / "benchmarks" / "results" / "biography"
# replay rows: the method, and the replayed old data (Task-0 QA, or the base model's own samples)
REPLAY_ROWS = {"full+replay": "full", "scale_route+replay": "scale_route", "full+replay_samples": "full",
               "full+replay_format_samples": "full"}
REPLAY_SOURCES = {"full+replay": "task0_qa", "scale_route+replay": "task0_qa", "full+replay_samples": "samples",
                  "full+replay_format_samples": "format_samples"}
# learned-route rows: the method, the router's old side (Task-0 QA, or the base model's own samples), and where
# fit_router sets its threshold (RouterConfig.calibrate_on: on held-out Task-0 questions, or on all of them: the
# Task-0 QA is exactly what must be kept here, the "+fitted" rows)
ROUTED_ROWS = {
    "scale_ffn_routed": ("scale_ffn_routed", "task0_qa", "held_out"),
    "scale_routed": ("scale_routed", "task0_qa", "held_out"),
    "scale_ffn_routed+fitted": ("scale_ffn_routed", "task0_qa", "fitted"),
    "scale_routed+fitted": ("scale_routed", "task0_qa", "fitted"),
    "scale_ffn_routed+samples": ("scale_ffn_routed", "samples", "held_out"),
    "scale_routed+samples": ("scale_routed", "samples", "held_out"),
    # the old side sampled from the base model in the Task-1 data's format (BaseModelSamples(in_new_data_format=True))
    "scale_ffn_routed+format": ("scale_ffn_routed", "format_samples", "held_out"),
    "scale_routed+format": ("scale_routed", "format_samples", "held_out"),
    # the README's first routed example as written (README_RECIPE): RouterConfig() with its defaults (calibrate_on
    # None: the config's own), the old side the Task-0 QA or none at all (fit_router draws the base model's samples)
    "scale_ffn_routed_defaults": ("scale_ffn_routed", "task0_qa", None),
    "scale_ffn_routed_defaults+samples": ("scale_ffn_routed", "fit_router_samples", None),
    # ... with the one setting docs/router.md gives for old data that is exactly what must be kept (a set of facts)
    "scale_ffn_routed_defaults+fitted": ("scale_ffn_routed", "task0_qa", "fitted"),
}
# what the README's routed example trains with beyond the router's defaults: create_scale_optimizer's AdamW (torch's
# betas, no weight decay, W12 at its default ratio), lr 3e-3, a cosine schedule after 10% warm-up, and the Trainer's
# gradient clipping at 1.0 (the other rows keep this benchmark's loop: betas 0.9/0.98, 5% warm-up, no clipping)
README_RECIPE = {"lr": README_ROUTED_LR, "betas": (0.9, 0.999), "warmup_fraction": 0.1, "max_grad_norm": 1.0}
README_RECIPE_ROWS = ("scale_ffn_routed_defaults", "scale_ffn_routed_defaults+samples", "scale_ffn_routed_defaults+fitted")
ROWS = (*METHODS, *ROUTED_ROWS, *REPLAY_ROWS)
# the rows of the learned router's own plots (the main plots keep the other rows: one colour each)
LEARNED_ROUTER_PLOT_ROWS = ("full", "full+replay", "full+replay_samples", "full+replay_format_samples", "scale_route",
                            *ROUTED_ROWS)
REPLAY_FRACTION = 0.25
ROUTER_BATCH = 32  # sequences per generate() of the base model's samples (BaseModelSamples.batch_size) and replay
GOAL = {"task0_retained": 0.95, "task1_first_token": 0.95}  # the learned router's goal (routed rows)
METRICS = ("task0_first_token", "task0_exact_match", "task1_first_token", "task1_exact_match")


@dataclass
class Settings:
    """Everything that defines a run (written to results.json)."""

    task0_people: int
    task1_people: int
    bios_per_person: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    pretrain_steps: int
    pretrain_lr: float
    qa_steps: int
    qa_lr: float
    continual_steps: int
    eval_every: int
    batch_size: int
    sizes: MethodSizes
    lr_grid: dict
    seed: int = 0
    task1_bios: bool = False  # stage 3 learns Task-1 QA only (the issue); True: Task-1 biographies as well
    router_hidden: int = 256  # the learned routers' MLP width (RouterConfig.hidden) of the routed rows
    router_samples: int = 600  # base-model samples of the +samples rows and full+replay_samples (one per Task-1 QA)
    # draws of the +format rows and full+replay_format_samples (BaseModelSamples(count=..., in_new_data_format=True));
    # 19,200 = 32 per Task-1 QA: format_samples/findings.md measured the routing there (more draws, more coverage)
    router_format_samples: int = 19200
    router_format_share: float = 0.05  # the +format rows' and full+replay_format_samples' BaseModelSamples.format_share
    router_format_max_old_error: float = 0.01  # the +format rows' max_old_error (0.1.0's default)
    w12_lr_ratio: float = 1.0  # SCALE rows: W12's learning rate over the row's (peft_scale.scale_optimizer_param_groups)

    @classmethod
    def full(cls) -> "Settings":
        """The full run, sized to fit the issue's budget (see results.md for the measured times)."""
        return cls(
            task0_people=200, task1_people=100, bios_per_person=5,
            hidden_size=96, intermediate_size=384, num_layers=4, num_heads=3,
            pretrain_steps=1500, pretrain_lr=1e-3, qa_steps=300, qa_lr=1e-3,
            continual_steps=400, eval_every=40, batch_size=32,
            # d_up = one new head of 32 (H/3), I_up = I/4, bottom half preserved, one LLaMA Pro block per 2 layers
            sizes=MethodSizes(ffn_expansion=96, hidden_expansion=32, preserve_layers=2, llama_pro_blocks=2),
            lr_grid=default_lr_grid(),
        )

    @classmethod
    def quick(cls) -> "Settings":
        """A smoke run (CI): every stage and every method, a few steps each. Its numbers mean nothing."""
        return cls(
            task0_people=20, task1_people=10, bios_per_person=2,
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
            pretrain_steps=20, pretrain_lr=3e-3, qa_steps=10, qa_lr=3e-3,
            continual_steps=6, eval_every=3, batch_size=8,
            sizes=MethodSizes(ffn_expansion=16, hidden_expansion=16, preserve_layers=1, llama_pro_blocks=1),
            lr_grid={row: lrs[len(lrs) // 2 : len(lrs) // 2 + 1] for row, lrs in default_lr_grid().items()},
            router_hidden=16, router_samples=20, router_format_samples=40,
        )


def default_lr_grid() -> dict:
    """Three learning rates per method, centred where each kind of method trains well (cf. the paper: 1e-5 full
    fine-tuning and baselines, 2e-4 LLaMA Pro, 1e-3 SCALE on a 1B model; a model this small takes larger rates)."""
    dense = (1e-4, 3e-4, 1e-3)
    new_parameters = (3e-4, 1e-3, 3e-3)
    scale = (1e-3, 3e-3, 1e-2)
    grid = {"full": dense, "freeze": dense, "lora": new_parameters, "llama_pro": new_parameters}
    grid.update({name: scale for name in METHODS if name.startswith("scale_")})
    grid.update({row: grid[method] for row, method in REPLAY_ROWS.items()})
    grid.update({row: scale for row in ROUTED_ROWS})
    grid.update({row: (README_RECIPE["lr"],) for row in README_RECIPE_ROWS})  # the README's rate only: no sweep
    return grid


def row_method(row: str) -> str:
    """The ``benchmarks.methods`` method a row trains."""
    if row in REPLAY_ROWS:
        return REPLAY_ROWS[row]
    return ROUTED_ROWS[row][0] if row in ROUTED_ROWS else row


# ------------------------------------------------------------------------------------------------ the stages


def is_route(model) -> bool:
    """A SCALE-Route PeftModel (its evaluation adds routing diagnostics)."""
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "variant", None) == "route"


class Experiment:
    """The data, the tokenizer and the evaluation sets of one run (cheap to rebuild: workers rebuild it)."""

    def __init__(self, settings: Settings, device: torch.device, dtype: str):
        self.settings, self.device, self.dtype = settings, device, dtype
        self.autocast = functools.partial(autocast, device, dtype)  # a fresh context for each use
        self.tokenizer = build_tokenizer()
        self.collator = make_collator(self.tokenizer)
        s = settings
        self.task0, self.task1 = make_tasks(s.task0_people, s.task1_people, s.seed)
        self.task0_bios = biographies(self.task0, s.bios_per_person, s.seed)
        self.task1_bios = biographies(self.task1, s.bios_per_person, s.seed + 1)
        self.task0_qa, self.task1_qa = qa_pairs(self.task0), qa_pairs(self.task1)
        self.eval_sets = {
            "task0": QAEvalSet.build(self.tokenizer, self.task0_qa),
            "task1": QAEvalSet.build(self.tokenizer, self.task1_qa),
        }
        task1_rows = [encode_qa(self.tokenizer, pair) for pair in self.task1_qa]
        # the base model's samples start where a Task-1 question starts (<s> and its first word), one per question,
        # and are as long as the longest Task-1 QA sequence (so every sampled question has room for its answer)
        self.sample_prompts = torch.tensor([row["input_ids"][:2] for row in task1_rows])
        self.sample_length = max(len(row["input_ids"]) for row in task1_rows)
        self._drawn = {}  # the base model's samples, drawn once (_drawn_once): "samples", "format_samples"

    def evaluate(self, model) -> dict:
        """Task-0 and Task-1 QA metrics (``task0_first_token``, ...), with routing diagnostics for SCALE-Route."""
        routing = (lambda: model.base_model.last_routing) if is_route(model) else None  # noqa: E731
        out = {}
        for task, eval_set in self.eval_sets.items():
            for metric, value in qa_accuracy(model, eval_set, self.device, self.autocast, routing=routing).items():
                out[f"{task}_{metric}"] = value
        return out

    def new_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.settings
        config = LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
            max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        torch.manual_seed(s.seed)
        return LlamaForCausalLM(config).to(self.device)

    def pretrain(self, log) -> tuple:
        """Stages 1 and 2: biographies from scratch, then Task-0 QA. Returns (model, report)."""
        s = self.settings
        model = self.new_model()
        common = dict(collator=self.collator, batch_size=s.batch_size, device=self.device, autocast=self.autocast)
        bios = repeat_shuffled(examples_dataset(self.tokenizer, texts=self.task0_bios), s.pretrain_steps * s.batch_size, s.seed)
        log(f"stage 1: {s.pretrain_steps} steps on {len(self.task0_bios)} Task-0 biographies")
        stage1 = train(model, bios, lr=s.pretrain_lr, **common)
        log(f"  {stage1['step_s'] * 1000:.1f} ms/step, final loss {stage1['final_loss']:.3f}")
        qa = repeat_shuffled(examples_dataset(self.tokenizer, pairs=self.task0_qa), s.qa_steps * s.batch_size, s.seed)
        log(f"stage 2: {s.qa_steps} steps on {len(self.task0_qa)} Task-0 QA pairs")
        stage2 = train(model, qa, lr=s.qa_lr, **common)
        after = self.evaluate(model.eval())
        log(f"  {stage2['step_s'] * 1000:.1f} ms/step, final loss {stage2['final_loss']:.3f}, QA after: {fmt(after)}")
        report = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(self.tokenizer),
            "stage1": {k: v for k, v in stage1.items() if k != "curve"},
            "stage2": {k: v for k, v in stage2.items() if k != "curve"},
            "qa_after_stage2": after,
        }
        return model, report

    def new_data(self):
        """Stage 3's new data (each example once): Task-1 QA, and Task-1 biographies with ``task1_bios``."""
        s = self.settings
        return examples_dataset(self.tokenizer, texts=self.task1_bios if s.task1_bios else [], pairs=self.task1_qa)

    def base_samples(self, base_model) -> list:
        """``router_samples`` samples of ``base_model`` (the stage-2 model), drawn exactly as ``fit_router`` draws
        its old side with the same arguments (``sample_base_model``: temperature 1, full length, the same seed)."""
        from peft_scale.router_fitting import sample_base_model

        s = self.settings
        return self._drawn_once("samples", base_model, lambda: sample_base_model(
            base_model, self.sample_prompts, s.router_samples, self.sample_length, ROUTER_BATCH, s.seed, progress=False
        ))

    def samples_dataset(self, base_model):
        """The base model's samples as training examples: the loss on every sampled token (not on the prompt)."""
        return _replay_dataset(self.base_samples(base_model), unlabelled=self.sample_prompts.shape[1])

    def format_samples(self, base_model) -> list:
        """``router_format_samples`` draws of ``base_model`` in the Task-1 data's format, drawn exactly as
        ``fit_router`` draws its old side from ``BaseModelSamples(in_new_data_format=True)`` with the same arguments
        (the kept ones)."""
        from peft_scale.format_sampling import sample_in_format
        from peft_scale.router_fitting import token_sequences

        s = self.settings
        return self._drawn_once("format_samples", base_model, lambda: sample_in_format(
            base_model, token_sequences(self.new_data(), "new_data", len(self.tokenizer)), s.router_format_samples,
            s.router_format_share, ROUTER_BATCH, s.seed, progress=False,
        ))

    def format_samples_dataset(self, base_model):
        """The format samples as training examples: the loss on every token after ``<s>`` (each is the base
        model's own, format tokens included, as the router's old side sees them)."""
        return _replay_dataset(self.format_samples(base_model), unlabelled=1)

    def _drawn_once(self, kind: str, base_model, draw) -> list:
        """``draw()`` with ``base_model`` in eval mode, once per experiment and ``kind`` (then the kept draws)."""
        if kind not in self._drawn:
            was_training = base_model.training
            base_model.eval()
            self._drawn[kind] = draw()
            base_model.train(was_training)
        return self._drawn[kind]

    def continual_stream(self, row: str, base_model=None):
        """Stage 3's training examples in order: Task-1 QA (and biographies with ``task1_bios``); replay rows mix
        in 25% old data: Task-0 QA, the old task's training data (which are also the Task-0 questions evaluated, so
        replay here rehearses the test itself: the most replay can do), or the base model's own samples."""
        s = self.settings
        length = s.continual_steps * s.batch_size
        new = self.new_data()
        if row not in REPLAY_ROWS:
            return repeat_shuffled(new, length, s.seed + 2)
        if REPLAY_SOURCES[row] == "samples":
            old = self.samples_dataset(base_model)
        elif REPLAY_SOURCES[row] == "format_samples":
            old = self.format_samples_dataset(base_model)
        else:
            old = examples_dataset(self.tokenizer, pairs=self.task0_qa)
        mixed = mix_with_replay(repeat_shuffled(new, length, s.seed + 2), repeat_shuffled(old, length, s.seed + 3),
                                REPLAY_FRACTION, seed=s.seed + 4)
        return mixed.select(range(length))

    def row_sizes(self, row: str) -> MethodSizes:
        """The sizes a row builds its method with: the routed rows add their ``router`` (``RouterConfig`` fields:
        0.1.0's settings, ``router_hidden``, the seed, the row's ``calibrate_on`` and, for ``+format``,
        ``router_format_max_old_error``) to the scale options; a ``--scale-option router={...}`` adds its fields."""
        s, sizes = self.settings, self.settings.sizes
        if row not in ROUTED_ROWS:
            return sizes
        _, old_side, calibrate_on = ROUTED_ROWS[row]
        if row in README_RECIPE_ROWS:  # RouterConfig() as the README writes it: nothing set but the row's calibrate_on
            router = {"calibrate_on": calibrate_on} if calibrate_on else {}
        else:
            router = {**ROUTER_0_1_0, "hidden": s.router_hidden, "seed": s.seed, "calibrate_on": calibrate_on}
        if old_side == "format_samples":
            router["max_old_error"] = s.router_format_max_old_error
        router.update(sizes.scale_options.get("router", {}))
        return dataclasses.replace(sizes, scale_options={**sizes.scale_options, "router": router})

    def fit_router(self, model, row: str, base_model) -> dict:
        """Fit a routed row's router before stage 3: the new side is stage 3's new data; the old side is the
        Task-0 QA or (``+samples``) the base model's own samples. Returns fit_router's report (and its time)."""
        s = self.settings
        begin = time.perf_counter()
        _, old_side, _ = ROUTED_ROWS[row]  # (calibrate_on is in the row's RouterConfig: row_sizes)
        if old_side == "task0_qa":
            report = fit_method_router(model, self.new_data(), examples_dataset(self.tokenizer, pairs=self.task0_qa))
            extra = {"old_side": "Task-0 QA"}
        elif old_side == "fit_router_samples":  # old_data=None: fit_router draws BaseModelSamples() itself
            report = fit_method_router(model, self.new_data(), None)
            extra = {"old_side": "base model samples drawn by fit_router (old_data=None)"}
        elif old_side == "format_samples":
            samples = BaseModelSamples(count=s.router_format_samples, in_new_data_format=True,
                                       format_share=s.router_format_share, batch_size=ROUTER_BATCH)  # fmt: skip
            report, extra = self._fit_on_samples(
                model, "sample_in_format", lambda: self.format_samples(base_model), begin, samples
            )
            extra = {"old_side": "base model samples in the Task-1 format", **extra,
                     "num_samples": s.router_format_samples}
        else:
            samples = BaseModelSamples(count=s.router_samples, length=self.sample_length, prompts=self.sample_prompts,
                                       batch_size=ROUTER_BATCH)  # fmt: skip
            report, extra = self._fit_on_samples(
                model, "sample_base_model", lambda: self.base_samples(base_model), begin, samples
            )
            extra = {"old_side": "base model samples", **extra, "sample_length": self.sample_length,
                     "num_samples": s.router_samples}
        return {**dataclasses.asdict(report), "fit_s": time.perf_counter() - begin, **extra}

    def _fit_on_samples(self, model, sampler: str, replayed, begin: float, samples: BaseModelSamples) -> tuple:
        """``fit_router`` with the old side ``samples``, drawn by ``router_fitting.<sampler>``; returns its report and whether
        the samples it fitted on are exactly ``replayed()`` (what the replay row trains on, drawn after the fit, so
        not in its time), how many, and the time since ``begin``."""
        captured: list = []
        with _capturing_samples(captured, sampler):
            report = fit_method_router(model, self.new_data(), samples)
        fit_s = time.perf_counter() - begin
        replayed = replayed()
        same = len(captured) == len(replayed) and all(torch.equal(a, b) for a, b in zip(captured, replayed))
        return report, {"samples_equal_replay_samples": same, "samples_kept": len(captured), "fit_s": fit_s}

    def continual(self, base_model, row: str, lr: float) -> dict:
        """Stage 3 for one method and learning rate, from a copy of the stage-2 model (a routed row fits its
        router first)."""
        s = self.settings
        torch.manual_seed(s.seed + 5)  # the methods' random initialisations (SCALE's W21/W22, LoRA's A)
        model = prepare_method(row_method(row), copy.deepcopy(base_model), self.row_sizes(row)).to(self.device)
        router = self.fit_router(model, row, base_model) if row in ROUTED_ROWS else None
        if row in README_RECIPE_ROWS:  # create_scale_optimizer's groups at their defaults, the Trainer's loop
            recipe = {k: v for k, v in README_RECIPE.items() if k != "lr"}
            param_groups = scale_optimizer_param_groups(model, lr)
        else:  # W12's own learning rate (learning_per_step_findings.md); a model without W12: one group at lr
            recipe = {}
            groups = s.w12_lr_ratio != 1.0
            param_groups = scale_optimizer_param_groups(model, lr, w12_lr_ratio=s.w12_lr_ratio) if groups else None
        result = train(
            model, self.continual_stream(row, base_model), collator=self.collator, batch_size=s.batch_size, lr=lr,
            device=self.device, autocast=self.autocast, eval_every=s.eval_every, evaluate=lambda: self.evaluate(model),
            param_groups=param_groups, **recipe,
        )
        if router is not None:
            result["router"] = router
        result["trainable_parameters"] = trainable_parameters(model)
        result["final"] = {k: result["curve"][k][-1] for k in METRICS}
        return result


def _replay_dataset(samples: list, unlabelled: int):
    """Samples as training examples: the loss on every token after the first ``unlabelled`` (the prompt)."""
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": ids.tolist(), "labels": [IGNORE] * unlabelled + ids[unlabelled:].tolist()}
                              for ids in samples])


@contextlib.contextmanager
def _capturing_samples(store: list, sampler: str):
    """Keep what ``fit_router`` samples from the base model (``router_fitting.<sampler>``: ``sample_base_model``, or
    ``sample_in_format``) in ``store``, to check that ``full+replay_samples`` (``full+replay_format_samples``) replays
    the very samples the ``+samples`` (``+format``) routers were fitted on."""
    from peft_scale import router_fitting

    original = getattr(router_fitting, sampler)

    def sample_and_keep(*args, **kwargs):
        samples = original(*args, **kwargs)
        store.extend(samples)
        return samples

    setattr(router_fitting, sampler, sample_and_keep)
    try:
        yield
    finally:
        setattr(router_fitting, sampler, original)


# ------------------------------------------------------------------------------------------- sweep and report


def fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def best_learning_rate(runs: dict) -> str:
    """The stated rule: highest final Task-1 first-token accuracy; within 0.005 of it, highest final Task-0."""
    top = max(r["final"]["task1_first_token"] for r in runs.values())
    near = {lr: r for lr, r in runs.items() if r["final"]["task1_first_token"] >= top - 0.005}
    return max(near, key=lambda lr: (near[lr]["final"]["task0_first_token"], near[lr]["final"]["task1_first_token"]))


def summarise(rows: dict) -> dict:
    """Per row, at its chosen learning rate: the final metrics, retention (final / start Task-0 first-token)."""
    table = {}
    for row, runs in rows.items():
        lr = best_learning_rate(runs)
        run = runs[lr]
        start = run["curve"]["task0_first_token"][0]
        table[row] = {
            "lr": float(lr),
            **run["final"],
            "task0_start": start,
            "retained": run["final"]["task0_first_token"] / start if start else float("nan"),
            "trainable_parameters": run["trainable_parameters"],
            "step_ms": 1000 * run["step_s"],
        }
        if "router" in run:
            table[row]["router"] = {k: run["router"][k] for k in ROUTER_REPORT_KEYS if k in run["router"]}
    return table


ROUTER_REPORT_KEYS = ("old_side", "old_to_base", "new_to_expansion", "threshold", "first_tokens_old_to_base",
                      "first_tokens_new_to_expansion", "layer", "tokens", "held_out_tokens", "fit_s",
                      "samples_equal_replay_samples", "num_samples", "samples_kept")


def bar_check(table: dict, sweep: dict) -> dict:
    """The issue's bar, computed (it is reported, never tuned to).

    At the learning rate the stated rule chose, and also at the most favourable learning rate of the sweep for the
    bar: the best retention among the learning rates that reach 90% of full fine-tuning's Task-1 accuracy.
    """
    out = {}
    full = table.get("full")
    for row in ("scale_route", "scale_preserve"):
        if row in table and full:
            need = 0.90 * full["task1_first_token"]
            learned = table[row]["task1_first_token"] / full["task1_first_token"] if full["task1_first_token"] else float("nan")
            start = table[row]["task0_start"]
            reaching = {lr: run["final"]["task0_first_token"] / start for lr, run in sweep[row].items()
                        if run["final"]["task1_first_token"] >= need}
            best = max(reaching, key=reaching.get) if reaching else None
            out[row] = {
                "retained": table[row]["retained"], "retained_target": 0.95,
                "task1_vs_full": learned, "task1_vs_full_target": 0.90,
                "meets_bar": bool(table[row]["retained"] >= 0.95 and learned >= 0.90),
                "best_retained_at_90pct_of_full_task1": reaching[best] if best else None,
                "its_lr": float(best) if best else None,
            }
    for row in ("full", "llama_pro"):
        if row in table:
            out[row] = {"retained": table[row]["retained"], "paper": "about 0.15 of Task-0 left"}
    for row in ROUTED_ROWS:  # the learned router's goal: keep >= 0.95 of Task-0 and learn >= 0.95 of Task-1
        if row in table:
            start = table[row]["task0_start"]

            def meets(final):
                return final["task0_first_token"] / start >= GOAL["task0_retained"] and \
                    final["task1_first_token"] >= GOAL["task1_first_token"]

            out[row] = {
                "retained": table[row]["retained"], "retained_target": GOAL["task0_retained"],
                "task1_first_token": table[row]["task1_first_token"], "task1_target": GOAL["task1_first_token"],
                "meets_goal": bool(meets(table[row])),
                "lrs_meeting_goal": [float(lr) for lr, run in sorted(sweep[row].items(), key=lambda i: float(i[0]))
                                     if meets(run["final"])],
            }
    return out


def markdown(result: dict) -> str:
    s, table = result["settings"], result["table"]
    pre = result["pretraining"]
    lines = [
        "# Synthetic biographies: forgetting (Task-0) vs learning (Task-1)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['description']}; {result['device']}, {result['dtype']}; "
        f"total {result['total_s'] / 60:.1f} min.",
        "",
        *[f"Rows added later (`--merge`, same stage-2 model): {', '.join(run['rows'])}: `{run['command']}`; "
          f"{run['machine']['description']}; {run['total_s'] / 60:.1f} min.  " for run in result.get("merged_runs", [])],
        *([""] if result.get("merged_runs") else []),
        f"Model: Llama, {s['num_layers']} layers, hidden {s['hidden_size']}, FFN {s['intermediate_size']}, "
        f"{s['num_heads']} heads, {pre['parameters']:,} parameters, word-level vocabulary of {pre['vocab_size']}. "
        f"Task-0: {s['task0_people']} people, Task-1: {s['task1_people']} people, {s['bios_per_person']} "
        f"biographies each, 6 attributes. Stage 1: {s['pretrain_steps']} steps (lr {s['pretrain_lr']}); stage 2: "
        f"{s['qa_steps']} QA steps (lr {s['qa_lr']}); stage 3: {s['continual_steps']} steps per method on Task-1 "
        f"{'biographies and QA' if s['task1_bios'] else 'QA'}, batch "
        f"{s['batch_size']}, AdamW, cosine schedule, 5% warm-up (the `*_defaults` rows: the README's routed recipe, "
        f"`README_RECIPE`: lr {README_RECIPE['lr']:g}, W12 at `create_scale_optimizer`'s ratio, 10% warm-up, "
        "clipping at 1.0).",
        "",
        f"After stage 2 (the model every method starts from): {fmt(pre['qa_after_stage2'])}.",
        "",
        f"Sizes: {s['sizes']}. Learning rate per method: the best final Task-1 first-token accuracy of its sweep "
        "(ties within 0.005: best Task-0); the whole sweep is in results.json.",
        "",
        "| method | lr | trainable | Task-0 first | Task-0 exact | retained | Task-1 first | Task-1 exact | ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in table.items():
        lines.append(
            f"| {row} | {r['lr']:g} | {r['trainable_parameters']:,} | {r['task0_first_token']:.3f} | "
            f"{r['task0_exact_match']:.3f} | {r['retained']:.3f} | {r['task1_first_token']:.3f} | "
            f"{r['task1_exact_match']:.3f} | {r['step_ms']:.1f} |"
        )
    lines += ["", "retained = final Task-0 first-token accuracy / its value at step 0 (the stage-2 model).", ""]
    lines += learned_router_markdown(result)
    if result["bar"]:
        lines += ["The issue's bar (reported, not tuned to):", ""]
        for row, check in result["bar"].items():
            lines.append(f"- {row}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))
        lines.append("")
    lines += ["The whole sweep (final step; the chosen learning rate in bold):", "",
              "| method | lr | Task-0 first | Task-1 first | Task-0 exact | Task-1 exact |", "|---|---|---|---|---|---|"]
    for row, runs in result["sweep"].items():
        for lr, run in sorted(runs.items(), key=lambda item: float(item[0])):
            f = run["final"]
            mark = "**" if float(lr) == table[row]["lr"] else ""
            lines.append(f"| {row} | {mark}{float(lr):g}{mark} | {f['task0_first_token']:.3f} | {f['task1_first_token']:.3f} | "
                         f"{f['task0_exact_match']:.3f} | {f['task1_exact_match']:.3f} |")
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in result["plots"]), ""]
    if result.get("notes"):
        lines += ["## Findings", "", result["notes"], ""]
    return "\n".join(lines)


def learned_router_markdown(result: dict) -> list[str]:
    """The routed rows: the goal, fit_router's held-out report and where the router sent each kind of token."""
    table = result["table"]
    routed = [row for row in ROUTED_ROWS if row in table]
    if not routed:
        return []
    s = result["settings"]
    lines = [
        "Learned router (routed rows): router MLP of "
        f"{s.get('router_hidden', '?')} hidden units on the stream entering layer {s['sizes']['preserve_layers']}; "
        "new side: the Task-1 training sequences; old side: the Task-0 QA, or (+samples) "
        f"{s.get('router_samples', '?')} base-model samples started from `<s>` and the first word of a Task-1 "
        f"question, or (+format) {s.get('router_format_samples', '?')} base-model draws in the Task-1 QA's format "
        f"(`BaseModelSamples(in_new_data_format=True, format_share={s.get('router_format_share', 0.05)})`, "
        f"`max_old_error={s.get('router_format_max_old_error', 0.01)}`, repeats and write-backs of Task-1 people "
        "dropped); the `*_defaults` rows: `RouterConfig()` as the README writes it (nothing set), old side the "
        "Task-0 QA or (+samples) none (`fit_router` draws `BaseModelSamples()` itself); `+fitted`: "
        "`RouterConfig(calibrate_on=\"fitted\")`. "
        "Goal: Task-0 retained >= 0.95 and Task-1 first-token >= 0.95. Router columns: fit_router's "
        "held-out report (old tokens to the base model, new tokens to the expansion; the same on each sequence's "
        "first 8 tokens). Routing columns (final evaluation): share of answer tokens and of first-answer positions "
        "(the `:` that predicts it) sent to the base model, and of questions with every token on the base model.",
        "",
        "| row | lr | Task-0 kept | Task-1 learned | goal | router old->base | router new->exp | first 8 old/new | "
        "threshold | T0 answer->base | T0 first->base | T0 all-base | T1 answer->base | T1 first->base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in routed:
        r, router = table[row], table[row].get("router", {})
        curve = result["sweep"][row][str(r["lr"])]["curve"]

        def last(key):
            return f"{curve[key][-1]:.3f}" if key in curve else "-"

        goal = result["bar"].get(row, {})
        lines.append(
            f"| {row} | {r['lr']:g} | {r['retained']:.3f} | {r['task1_first_token']:.3f} | "
            f"{'met' if goal.get('meets_goal') else 'missed'} | {router.get('old_to_base', float('nan')):.3f} | "
            f"{router.get('new_to_expansion', float('nan')):.3f} | {router.get('first_tokens_old_to_base', float('nan')):.3f}"
            f" / {router.get('first_tokens_new_to_expansion', float('nan')):.3f} | {router.get('threshold', float('nan')):.6g} | "
            f"{last('task0_to_preservation')} | {last('task0_first_answer_to_base')} | {last('task0_sequences_all_base')} | "
            f"{last('task1_to_preservation')} | {last('task1_first_answer_to_base')} |"
        )
    from benchmarks.biography.train import TOKEN_ROLES

    lines += ["", "Share of each kind of token the router sends to the base model (final evaluation; Task-0 / Task-1):", "",
              "| row | " + " | ".join(TOKEN_ROLES) + " |", "|---|" + "---|" * len(TOKEN_ROLES)]
    for row in routed:
        curve = result["sweep"][row][str(table[row]["lr"])]["curve"]
        cells = [f"{curve[f'task0_to_base_{role}'][-1]:.3f} / {curve[f'task1_to_base_{role}'][-1]:.3f}"
                 if f"task0_to_base_{role}" in curve else "-" for role in TOKEN_ROLES]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot(result: dict, output_dir: Path) -> list[str]:
    from benchmarks.plotting import plot_curves, plot_tradeoff

    curves = {row: result["sweep"][row][str(r["lr"])]["curve"] for row, r in result["table"].items()}
    learned = {row: curve for row, curve in curves.items() if row in LEARNED_ROUTER_PLOT_ROWS}
    main_curves = {row: curve for row, curve in curves.items() if row not in (*ROUTED_ROWS, "full+replay_samples",
                                                                                 "full+replay_format_samples")}
    made = []
    for key, title, ylabel in (
        ("task0_first_token", "Retention: Task-0 QA during Task-1 training", "Task-0 first-token accuracy"),
        ("task1_first_token", "Acquisition: Task-1 QA during Task-1 training", "Task-1 first-token accuracy"),
    ):
        for prefix, rows in (("", main_curves), ("learned_router_", learned)):
            if rows and (prefix == "" or any(row in ROUTED_ROWS for row in rows)):
                name = f"{prefix}{key}.png"
                plot_curves(rows, "step", key, output_dir / name, title if not prefix else f"{title} (learned router)",
                            ylabel)
                made.append(name)
    points = {row: (r["task0_start"] - r["task0_first_token"], r["task1_first_token"]) for row, r in result["table"].items()}
    plot_tradeoff(points, output_dir / "tradeoff.png", "Forgetting vs learning (biographies, final step)",
                  "forgetting: drop in Task-0 first-token accuracy", "learning: Task-1 first-token accuracy")
    made.append("tradeoff.png")
    route = result["table"].get("scale_route")
    if route is not None:  # SCALE-Route's cosine threshold, swept at evaluation on the same two heads' logits
        curve = result["sweep"]["scale_route"][str(route["lr"])]["curve"]
        taus = sorted(float(k[len("task0_first_token_tau_"):]) for k in curve if k.startswith("task0_first_token_tau_"))
        points = {f"tau {tau:g}": (route["task0_start"] - curve[f"task0_first_token_tau_{tau:g}"][-1],
                                   curve[f"task1_first_token_tau_{tau:g}"][-1]) for tau in taus}
        plot_tradeoff(points, output_dir / "route_thresholds.png",
                      f"SCALE-Route (lr {route['lr']:g}): routing threshold at evaluation",
                      "forgetting: drop in Task-0 first-token accuracy", "learning: Task-1 first-token accuracy")
        made.append("route_thresholds.png")
    return made


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["description"] = f"{info['gpu']}"
    else:
        info["description"] = f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s) per process"
    return info


# ----------------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(settings_json: str, device: str, dtype: str, model_dir: str, threads: int) -> None:
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    settings = settings_from_json(settings_json)
    _WORKER["experiment"] = Experiment(settings, torch.device(device), dtype)
    _WORKER["model"] = AutoModelForCausalLM.from_pretrained(model_dir).to(device)


def _run_job(row: str, lr: float) -> tuple:
    begin = time.perf_counter()
    result = _WORKER["experiment"].continual(_WORKER["model"], row, lr)
    result["wall_s"] = time.perf_counter() - begin
    return row, lr, result


def settings_to_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def settings_from_json(text: str) -> Settings:
    values = json.loads(text)
    values["sizes"] = MethodSizes(**values["sizes"])
    return Settings(**values)


def run_sweep(settings, rows, model, device, dtype, workers, threads, log) -> dict:
    jobs = [(row, lr) for row in rows for lr in settings.lr_grid[row]]
    sweep: dict = {row: {} for row in rows}
    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        init = (settings_to_json(settings), str(device), dtype, model_dir, threads)
        if workers <= 1:
            _init_worker(*init)
            done = (_run_job(row, lr) for row, lr in jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=init)
            done = pool.map(_run_job, *zip(*jobs))
        for row, lr, result in done:
            sweep[row][str(lr)] = result
            log(f"{row:20s} lr {lr:<7g} {result['step_s'] * 1000:6.1f} ms/step {result['wall_s']:6.1f} s  "
                f"{fmt(result['final'])}")
        if pool is not None:
            pool.shutdown()
    return sweep


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(items: list[str], flag: str) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} {item!r}: write FIELD=VALUE, e.g. {flag} preserve_layers=3.")
        pairs[key] = value
    return pairs


def apply_overrides(settings: Settings, args) -> None:
    """``--size``, ``--scale-option`` and ``--lr`` (ablations from the command line)."""
    known = {f.name for f in dataclasses.fields(MethodSizes)} - {"scale_options"}
    for key, value in _pairs(args.size, "--size").items():
        if key not in known:
            raise SystemExit(f"--size {key}=...: not a MethodSizes field; choose one of {sorted(known)}.")
        setattr(settings.sizes, key, int(value))
    settings.sizes.scale_options.update({k: _parse_value(v) for k, v in _pairs(args.scale_option, "--scale-option").items()})
    for row, value in _pairs(args.lr, "--lr").items():
        if row not in ROWS:
            raise SystemExit(f"--lr {row}=...: unknown method; choose one of {list(ROWS)}.")
        settings.lr_grid[row] = tuple(float(v) for v in value.split(","))


STAGE3_SETTINGS = (
    "continual_steps", "eval_every", "sizes", "lr_grid", "task1_bios", "router_hidden", "router_samples",
    "router_format_samples", "router_format_share", "router_format_max_old_error", "w12_lr_ratio",
)
# a --merge may change them
ROUTER_SETTINGS = ("router_hidden", "router_samples", "router_format_samples", "router_format_share",
                   "router_format_max_old_error")


def pretrain_or_load(experiment: Experiment, cache_dir, log) -> tuple:
    """Stages 1-2, or their saved result from ``cache_dir`` when a run with the same data and model made one."""
    if cache_dir is None:
        return experiment.pretrain(log)
    from transformers import AutoModelForCausalLM

    s = dataclasses.asdict(experiment.settings)
    stages = {k: v for k, v in s.items() if k not in STAGE3_SETTINGS}
    stages["dtype"] = experiment.dtype
    path = Path(cache_dir) / hashlib.sha1(json.dumps(stages, sort_keys=True).encode()).hexdigest()[:16]
    if (path / "report.json").exists():
        log(f"stages 1-2: loaded from {path}")
        model = AutoModelForCausalLM.from_pretrained(path).to(experiment.device)
        return model, json.loads((path / "report.json").read_text())
    model, report = experiment.pretrain(log)
    model.save_pretrained(path)
    (path / "report.json").write_text(json.dumps(report))
    return model, report


def merge(previous: dict, new: dict) -> dict:
    """``new``'s runs added to ``previous`` (a results.json of the same settings and the same stage-2 model): a run
    of the same row and learning rate replaces the old one; the caller recomputes the table, the bar and the plots.
    Raises SystemExit when the two runs do not share their settings (other than the learning-rate grid and the
    router's) or their stage-2 model (its losses and accuracies after stages 1-2)."""
    mine, theirs = previous["settings"], new["settings"]
    differ = [k for k in mine if k not in ("lr_grid", *ROUTER_SETTINGS) and mine[k] != theirs.get(k)]
    if previous["dtype"] != new["dtype"]:
        differ.append("dtype")
    same_model = all(previous["pretraining"][key] == new["pretraining"][key] for key in ("qa_after_stage2", "parameters"))
    same_model = same_model and all(previous["pretraining"][stage]["final_loss"] == new["pretraining"][stage]["final_loss"]
                                    for stage in ("stage1", "stage2"))
    if differ or not same_model:
        raise SystemExit(
            f"--merge: this run does not match {previous['command']!r}: different settings {differ}"
            + ("" if same_model else " and a different stage-2 model (losses or accuracies after stage 2)")
            + ". Write it to another --output-dir instead."
        )
    merged = copy.deepcopy(previous)
    for row, runs in new["sweep"].items():
        merged["sweep"].setdefault(row, {}).update(runs)
        grid = set(merged["settings"]["lr_grid"].get(row, ())) | set(theirs["lr_grid"][row])
        merged["settings"]["lr_grid"][row] = sorted(grid)
    order = {row: index for index, row in enumerate(ROWS)}
    merged["sweep"] = dict(sorted(merged["sweep"].items(), key=lambda item: order.get(item[0], len(order))))
    for key in ROUTER_SETTINGS:
        merged["settings"][key] = theirs[key]
    run = {key: new[key] for key in ("command", "device", "workers", "machine", "total_s")}
    merged.setdefault("merged_runs", []).append({**run, "rows": list(new["sweep"])})
    return merged


def render(results_json: Path, notes) -> dict:
    """Re-write results.md and the plots of a finished run (e.g. after adding findings with ``--notes``)."""
    result = json.loads(results_json.read_text())
    if notes is not None:
        result["notes"] = notes.read_text()
    result["table"] = summarise(result["sweep"])  # recomputed: the selection and the bar are functions of the sweep
    result["bar"] = bar_check(result["table"], result["sweep"])
    result["plots"] = plot(result, results_json.parent)
    results_json.write_text(json.dumps(result, indent=1))
    (results_json.parent / "results.md").write_text(markdown(result))
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few steps (CI)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    parser.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="METHOD",
                        help=f"rows to run (default: all): {', '.join(ROWS)}")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--workers", type=int, default=None,
                        help="stage-3 runs in parallel processes (default: 2 on CPU, one per core of the target "
                        "machine; 1 with --quick or on CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1 on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", default="full", choices=["full", "middle"],
                        help="'middle': only the middle learning rate of each method's grid (a reduced run)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="reuse the stage-2 model of a previous run with the same settings (saved there)")
    parser.add_argument("--size", action="append", default=[], metavar="FIELD=INT",
                        help="override a MethodSizes field, e.g. --size preserve_layers=3 (repeatable)")
    parser.add_argument("--scale-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra ScaleConfig field for the scale_* methods, e.g. --scale-option adapt_modules=attention")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                        help="override a method's learning-rate grid, e.g. --lr scale_route=0.01,0.03")
    parser.add_argument("--w12-lr-ratio", type=float, default=1.0, metavar="R",
                        help="SCALE rows: W12's learning rate is R times the row's (the other blocks keep it)")
    parser.add_argument("--format-share", type=float, default=None, metavar="F",
                        help="the +format rows' BaseModelSamples format_share (default 0.05, its default)")
    parser.add_argument("--format-max-old-error", type=float, default=None, metavar="E",
                        help="the +format rows' RouterConfig max_old_error (default 0.01, peft-scale 0.1.0's)")
    parser.add_argument("--task1-bios", action="store_true",
                        help="stage 3 also trains on Task-1 biographies (default: Task-1 QA only, as in the issue)")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only re-write results.md and the plots next to an existing results.json (with --notes)")
    parser.add_argument("--notes", type=Path, default=None, help="a markdown file of findings to put in results.md")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's rows to OUTPUT_DIR/results.json (a run of the same settings and stage-2 "
                        "model; refused otherwise) instead of replacing it, and re-render results.md and the plots")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    transformers.utils.logging.disable_progress_bar()
    if args.render is not None:
        return render(args.render, args.notes)
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = Settings.quick() if args.quick else Settings.full()
    settings.seed = args.seed
    log = lambda message: print(f"[{time.perf_counter() - begin:7.1f}s] {message}", flush=True)  # noqa: E731

    settings.task1_bios = args.task1_bios
    settings.w12_lr_ratio = args.w12_lr_ratio
    if args.format_share is not None:
        settings.router_format_share = args.format_share
    if args.format_max_old_error is not None:
        settings.router_format_max_old_error = args.format_max_old_error
    if args.workers is None:
        args.workers = 1 if (args.quick or device.type == "cuda") else min(2, os.cpu_count() or 1)
    apply_overrides(settings, args)
    if args.sweep == "middle":
        settings.lr_grid = {row: lrs[len(lrs) // 2 : len(lrs) // 2 + 1] for row, lrs in settings.lr_grid.items()}
    experiment = Experiment(settings, device, args.dtype)
    model, pretraining = pretrain_or_load(experiment, args.cache_dir, log)
    result = {
        "command": "python -m benchmarks.biography.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "device": str(device),
        "dtype": args.dtype,
        "workers": args.workers,
        "machine": machine_info(device),
        "settings": dataclasses.asdict(settings),
        "replay_fraction": REPLAY_FRACTION,
        "pretraining": pretraining,
        "sweep": {},
        "total_s": 0.0,
    }
    if args.merge:  # refuse before the sweep, not after it
        previous = json.loads((args.output_dir / "results.json").read_text())
        merge(previous, result)
    result["sweep"] = run_sweep(settings, args.methods, model.cpu(), device, args.dtype, args.workers, args.threads, log)
    result["notes"] = args.notes.read_text() if args.notes else ""
    result["total_s"] = time.perf_counter() - begin
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:
        notes = result["notes"] or previous.get("notes", "")
        result = merge(previous, result)
        result["notes"] = notes
    result["table"] = summarise(result["sweep"])
    result["bar"] = bar_check(result["table"], result["sweep"])
    result["plots"] = plot(result, args.output_dir)
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=1))
    (args.output_dir / "results.md").write_text(markdown(result))
    log(f"wrote {args.output_dir}/results.json, results.md and {len(result['plots'])} plots")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
