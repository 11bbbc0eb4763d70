"""Continual pre-training over a sequence of domains: English (the base model's) -> Spanish -> French.

Run from the repository root::

    python -m benchmarks.continual_pretraining.sequence --quick        # smoke test: the tiny model, a few steps
    python -m benchmarks.continual_pretraining.sequence --output-dir OUT
    python -m benchmarks.continual_pretraining.sequence --rows full full_replay --output-dir OUT/part2
    python -m benchmarks.continual_pretraining.sequence --output-dir OUT --merge-parts OUT/part1 OUT/part2

Protocol
--------
The base model, the text, the optimizer and the measures are ``run.py``'s (its functions are imported, not copied):
the bundled SmolLM2-135M-Instruct, the bundled Wikipedia summaries (held-out documents of each language excluded
from training), ``--steps`` AdamW steps of ``--batch-size`` packed blocks of ``--seq-len`` tokens per stage, a fresh
optimizer and warm-up/cosine schedule in each stage. Stage 1 trains on Spanish, stage 2 on French, each from the
first blocks of its language's training stream (``data.build_text`` with English as the old language, so stage 1's
blocks are exactly the ones ``run.py``'s Spanish runs train on). Rows (``ROWS``):

- ``scale_ffn_routed``: one learned-route SCALE-FFN adapter per domain. Stage 1: adapter ``es``, its router fitted
  (``fit_router``) on the first ``ROUTER_BLOCKS`` Spanish training blocks against as many English training blocks
  (as ``run.py``'s ``scale_ffn_routed``), then trained. Stage 2: adapter ``fr`` added, its router fitted on French
  against the English and the Spanish blocks; ``es``'s router refitted with the French blocks added to its old side
  (fitted against English alone, it never saw French; docs/several-domains.md), then ``fr``
  trained alone (``es``'s blocks do not train); evaluated with both active
  (``model.base_model.set_adapter(["es", "fr"])``). ``peft_scale.routing_confusion`` on held-out blocks of the
  three languages is recorded before and after the refit.
- ``scale_ffn_routed_pairwise``: the same, but every router's old side is English alone and the other Romance
  language is given in ``fit_router``'s ``other_domains`` (negatives when the router trains, not part of the
  threshold's calibration: the ``max_old_error`` bound against English only, the joint rule deciding between the
  two languages; issue 12).
- ``full`` and ``full_replay``: full fine-tuning, stage 2 continuing from stage 1's weights; ``full_replay`` mixes
  a ``REPLAY_FRACTION`` share of English training blocks into each stage (``run.py``'s ``full_replay``; both stages
  replay the same first English blocks, at the same steps).
- ``lora``: ``run.py``'s LoRA (rank matched to SCALE-Adapt's size), one adapter trained on Spanish, then further on
  French.
- ``scale_ffn_routed_fr_only``: the reference for "French learned as well as in a single stage": the routed
  adapter trained on French only, from the base model (router: French against English).
- ``scale_ffn_routed_pairwise_defaults`` and its reference ``scale_ffn_routed_fr_only_defaults``: the pairwise row
  with nothing set but what the README's first routed example sets: ``RouterConfig()``'s defaults,
  ``create_scale_optimizer(model, lr=3e-3)`` (``W12`` at 4x).
- ``scale_ffn_routed_outranking_defaults``: the same, but ``es``'s router is not refitted: ``fr``'s, fitted with the
  Spanish blocks as ``other_domains={"es": ...}`` (named after the adapter), outranks it, so routed together a token
  both claim goes to ``fr`` and ``es`` keeps every decision of stage 1 on the Spanish that ``fr`` does not claim.

The rows that do not say otherwise use the router settings of peft-scale 0.1.0 (``methods.ROUTER_0_1_0``: the rows
measured before 0.2). The ``*_ema_old`` rows (``smoothing_start="old"``, removed in 0.2: it measured no gain) are
no longer run; their results stay in the results folders, and a results.json that holds them still merges.

Measured after every stage (``measures.py`` through ``run.evaluate``, on held-out blocks): Spanish, French and
English perplexity, drift (mean KL(base || adapted) over the English tokens) and the perplexity of the base model's
greedy answers to English chat prompts; for routed rows the share of each language's tokens sent to the base model.

The issue's goals (``goals_of``): Spanish perplexity after stage 2 at most ``GOAL_SPANISH_RISE`` above after stage
1; English drift after stage 2 <= ``GOAL_DRIFT``; French perplexity drop (base -> after stage 2) >= ``GOAL_FRENCH``
of the single-stage reference's drop (for SCALE; the other methods have no single-stage French run here, so their
ratio against SCALE's reference is shown but not judged).

``results.json`` is rewritten after every row; rows already in it (same settings) are skipped, so an interrupted
command continues, and groups of ``--rows`` can run as parallel processes and be merged (``--merge-parts``). A
merged folder is a part like any other (its results.json holds all its rows), and parts made when ``ROWS`` had fewer
rows merge with newer ones (``joined_settings``). ``--merge-parts`` rewrites ``--output-dir``: to add a row to a
folder, merge into a new folder with that folder as the first part, then copy the files back.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from benchmarks.continual_pretraining import measures, report, run
from benchmarks.continual_pretraining.data import build_text, documents_or_summaries
from benchmarks.continual_pretraining.merge import merge_results
from benchmarks.methods import ROUTED_METHODS, ROUTER_0_1_0, fit_method_router, prepare_method, scale_config

DEFAULT_OUTPUT_DIR = run.DEFAULT_OUTPUT_DIR / "sequence"
QUICK_OUTPUT_DIR = run.DEFAULT_OUTPUT_DIR / "sequence_quick"
BASE_LANGUAGE = "en"
LANGUAGES = {"es": "Spanish", "fr": "French"}
ROUTER_BLOCKS = run.ROUTER_BLOCKS
REPLAY_FRACTION = run.REPLAY_FRACTION
CONFUSION_BLOCKS = 8  # held-out blocks per language that routing_confusion reads (the routers' decisions only)
CONFUSION_WHEN = {
    "before_refit": "before the refit of the earlier routers",
    "after_refit": "after the refit of the earlier routers",
    "no_refit": "with the earlier routers as they were fitted (not refitted)",
}

GOAL_SPANISH_RISE = 0.02  # Spanish perplexity after stage 2 at most 2% above after stage 1
GOAL_DRIFT = 0.02  # English drift after stage 2, nats/token
GOAL_FRENCH = 0.90  # French perplexity drop >= 90% of the single-stage run's


FRENCH_REFERENCE = "scale_ffn_routed_fr_only"


class Row(NamedTuple):
    """One row: the method (``benchmarks.methods``), its learning rate, the languages it trains on in order, and
    the share of English blocks replayed in each stage; for routed rows, ``other_domains``: the other languages are
    given to ``fit_router`` as ``other_domains`` (negatives, threshold against English only) instead of in its
    ``old_data``. ``w12_lr_ratio``, ``scale_options``, ``router_options`` and ``scale_optimizer``: as ``run.Run``'s
    (``W12``'s learning rate over the row's; ``ScaleConfig`` fields of this row; its ``RouterConfig`` fields, by
    default peft-scale 0.1.0's settings, which the rows defined before 0.2 used, ``()`` for ``RouterConfig()``'s
    defaults; ``create_scale_optimizer(model, lr=lr)`` as the optimizer). ``reference``: the single-stage French row its French is judged against
    (the same settings, French only). ``refit_earlier``: refit the earlier adapters' routers with the new language
    (in their old side, or as ``other_domains``); without it the new router outranks them (``other_domains`` named
    after their adapters) and they stay as stage 1 fitted them."""

    method: str
    lr: float
    languages: tuple[str, ...]
    replay: float = 0.0
    other_domains: bool = False
    w12_lr_ratio: float = 1.0
    scale_options: tuple = ()
    reference: str = FRENCH_REFERENCE
    refit_earlier: bool = True
    router_options: tuple = tuple(ROUTER_0_1_0.items())
    scale_optimizer: bool = False


# RouterConfig()'s defaults and the README's optimizer and rate: nothing set that the README's routed example does not
DEFAULTS = dict(w12_lr_ratio=4.0, router_options=(), scale_optimizer=True)
# In the order they run: the SCALE rows first, then the baselines (the last ones are dropped first when time is short).
ROWS = {
    "scale_ffn_routed": Row("scale_ffn_routed", 1e-3, ("es", "fr")),
    "scale_ffn_routed_pairwise": Row("scale_ffn_routed", 1e-3, ("es", "fr"), other_domains=True),
    FRENCH_REFERENCE: Row("scale_ffn_routed", 1e-3, ("fr",)),
    "full": Row("full", 1e-4, ("es", "fr")),
    "full_replay": Row("full", 1e-4, ("es", "fr"), REPLAY_FRACTION),
    "lora": Row("lora", 3e-4, ("es", "fr")),
    # the README's routed example as written (RouterConfig's defaults, create_scale_optimizer, lr 3e-3), the other
    # language as other_domains; and its French reference at the same settings (these replace the *_ema_old rows)
    "scale_ffn_routed_pairwise_defaults": Row(
        "scale_ffn_routed", 3e-3, ("es", "fr"), other_domains=True, reference="scale_ffn_routed_fr_only_defaults",
        **DEFAULTS,
    ),
    # the same without refitting es's router: fr's outranks it (issue 12: the refit sent more Spanish to the base)
    "scale_ffn_routed_outranking_defaults": Row(
        "scale_ffn_routed", 3e-3, ("es", "fr"), other_domains=True, reference="scale_ffn_routed_fr_only_defaults",
        refit_earlier=False, **DEFAULTS,
    ),
    "scale_ffn_routed_fr_only_defaults": Row("scale_ffn_routed", 3e-3, ("fr",), **DEFAULTS),
}  # the learning rates: cpu_40_steps' (SCALE and full fine-tuning at their best there, LoRA at run.py's middle one)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.continual_pretraining.sequence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {run.QUICK_DEFAULTS}")
    parser.add_argument("--model", default="bundled", help="'bundled' (SmolLM2-135M-Instruct), 'tiny', or a HF path/id")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows to make, from {list(ROWS)} (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    run.add_text_arguments(parser)
    run.add_machine_arguments(parser)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"default: {DEFAULT_OUTPUT_DIR.relative_to(run.REPO)} "
                        f"({QUICK_OUTPUT_DIR.relative_to(run.REPO)} with --quick)")  # fmt: skip
    parser.add_argument("--merge-parts", type=Path, nargs="+", default=None, metavar="DIR",
                        help="instead of training: join these folders' results.json into --output-dir and report")  # fmt: skip
    # run.default_sizes reads these: the sizes are run.py's defaults, derived from the model's config
    parser.set_defaults(ffn_expansion=None, hidden_expansion=None, preserve_layers=None, llama_pro_blocks=None,
                        scale_option=[])  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly win over the quick defaults
        parser.set_defaults(**{k: v for k, v in run.QUICK_DEFAULTS.items() if k != "eval_every"})
        args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = QUICK_OUTPUT_DIR if args.quick else DEFAULT_OUTPUT_DIR
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def settings_of(args, sizes) -> dict:
    """What a row's numbers depend on; results.json's rows are only reused under the same settings."""
    keys = ("model", "steps", "batch_size", "seq_len", "eval_blocks", "held_out_documents", "max_documents",
            "prompts", "max_new_tokens", "dtype", "seed")  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    settings.update(
        device_type=torch.device(args.device).type, sizes=vars(sizes), replay_fraction=REPLAY_FRACTION,
        base_language=BASE_LANGUAGE, languages=list(LANGUAGES), router_blocks=ROUTER_BLOCKS,
        rows={name: row_settings(row) for name, row in ROWS.items()},
    )  # fmt: skip
    return settings


def row_settings(row: Row) -> dict:
    """A row's definition as results.json has it; the fields added later only where they differ from their default
    (rows made before they existed have no such keys)."""
    settings = {**row._asdict(), "languages": list(row.languages)}
    for key, default in Row._field_defaults.items():
        if key != "replay" and settings[key] == default:
            del settings[key]
    for key in ("scale_options", "router_options"):
        if key in settings:
            settings[key] = dict(settings[key])
    return settings


def joined_settings(settings: list[dict]) -> dict:
    """Settings of results made by versions of this script with more or fewer ``ROWS``: equal but for ``rows``, whose
    rows in common must be defined alike; the union of their rows. ``ValueError`` otherwise."""
    first, *others = settings
    rows = dict(first["rows"])
    for other in others:
        rest = {k: v for k, v in other.items() if k != "rows"}
        if rest != {k: v for k, v in first.items() if k != "rows"}:
            raise ValueError(f"results made with other settings:\n  {other}\nvs\n  {first}")
        for name, definition in other["rows"].items():
            if rows.setdefault(name, definition) != definition:
                raise ValueError(f"row {name!r} is defined differently: {definition} vs {rows[name]}")
    ordered = sorted(rows, key=lambda name: list(ROWS).index(name) if name in ROWS else len(ROWS))  # ROWS' order
    return {**first, "rows": {name: rows[name] for name in ordered}}


def load_results(path: Path, settings: dict) -> dict:
    """``run.load_results``, also continuing a results.json made when ``ROWS`` had more or fewer rows (its rows'
    definitions must match)."""
    if path.is_file():
        results = json.loads(path.read_text())
        try:
            joined = joined_settings([settings, results.get("settings", {})])
        except ValueError:
            joined = None
        if joined is not None:
            return {**results, "settings": joined}
    return run.load_results(path, settings)


# ------------------------------------------------------------------------------------------------ the text


def build_texts(tokenizer, args) -> dict:
    """``{language: ExperimentText}``: each new language against English (``data.build_text``), so the English
    held-out blocks, training blocks and replay positions are the same for both."""
    english = documents_or_summaries(None, BASE_LANGUAGE)[: args.max_documents]
    texts = {}
    for language in LANGUAGES:
        texts[language] = build_text(
            tokenizer, new_documents=documents_or_summaries(None, language)[: args.max_documents],
            old_documents=english, held_out_documents=args.held_out_documents, eval_blocks=args.eval_blocks,
            train_blocks=args.steps * args.batch_size, seq_len=args.seq_len, replay_fraction=REPLAY_FRACTION,
            seed=args.seed, old_train_blocks=ROUTER_BLOCKS,
        )  # fmt: skip
    first, *others = texts.values()
    assert all(torch.equal(first.old_eval, t.old_eval) and torch.equal(first.old_train, t.old_train) for t in others)
    return texts


def held_out(texts: dict, blocks: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Held-out blocks of every language, keyed as ``routing_confusion`` names data sets (English: ``"base"``)."""
    sets = {language: text.new_eval[:blocks] for language, text in texts.items()}
    return {**sets, "base": texts["es"].old_eval[:blocks]}


# ------------------------------------------------------------------------------------------------ the measures


def stage_measures(model, texts: dict, reference: dict, args) -> dict:
    """Every measure after a stage: ``run.evaluate`` on the Spanish text (Spanish as its "new" language, English as
    its "old" one, the chat answers), renamed ``es_*`` / ``en_*``, and the French text's ``fr_*``."""
    point, _ = run.evaluate(model, texts["es"], reference, args)
    renamed = {}
    for key, value in point.items():
        if key.startswith("new_"):
            key = "es_" + key[len("new_") :]
        elif key.startswith("old_"):
            key = "en_" + key[len("old_") :]
        renamed[key] = value
    french = measures.text_measures(model, texts["fr"].new_eval, args.eval_batch_size, args.dtype)
    renamed.update({f"fr_{key}": value for key, value in french.items()})
    return renamed


# ------------------------------------------------------------------------------------------------ one row


def train_stage(
    model, blocks: torch.Tensor, lr: float, args, w12_lr_ratio: float = 1.0, scale_optimizer: bool = False
) -> dict:
    """``args.steps`` steps of ``run.train_step`` over ``blocks`` with a fresh optimizer and schedule (``W12`` at
    ``w12_lr_ratio`` times ``lr``, as ``run.py``'s rows; with ``scale_optimizer``, ``create_scale_optimizer``'s
    defaults)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if scale_optimizer:
        optimizer, schedule = run.with_schedule(run.create_scale_optimizer(model, lr=lr), args.steps)
    else:
        groups = run.parameter_groups(model, parameters, lr, w12_lr_ratio)
        optimizer, schedule = run.optimizer_and_schedule(groups, lr, args.steps)
    losses, seconds = [], []
    for step in range(1, args.steps + 1):
        batch = blocks[(step - 1) * args.batch_size : step * args.batch_size]
        loss, took = run.train_step(model, batch, parameters, optimizer, schedule, args.dtype)
        losses.append(loss)
        seconds.append(took)
        if not math.isfinite(loss):
            print(f"  loss became {loss} at step {step}; stopping this stage", flush=True)
            break
    model.eval()
    return {
        "trainable_parameters": sum(p.numel() for p in parameters),
        "train_loss": losses,
        "seconds": {"train": sum(seconds), "step_median": sorted(seconds)[len(seconds) // 2]},
    }


def router_blocks(texts: dict, language: str) -> torch.Tensor:
    """The blocks a router is fitted on for ``language``: its first ``ROUTER_BLOCKS`` training blocks (English:
    its training blocks that ``run.py``'s routers read)."""
    if language == BASE_LANGUAGE:
        return texts["es"].old_train
    return texts[language].new_train[:ROUTER_BLOCKS]


def fit_domain_router(model, texts: dict, language: str, others: list[str], other_domains: bool = False) -> dict:
    """Fit ``language``'s router (its adapter has the language's name) against English and ``others``: in its old
    side, or, with ``other_domains``, as ``fit_router``'s ``other_domains`` (English alone the old side). The record
    has the report and the adapter's ``RouterConfig`` as fitted (its ``outranks``)."""
    old_side = [BASE_LANGUAGE] if other_domains else [BASE_LANGUAGE, *others]
    old = torch.cat([router_blocks(texts, other) for other in old_side])
    extra = {}
    if other_domains and others:
        extra["other_domains"] = {other: router_blocks(texts, other) for other in others}
    start = time.perf_counter()
    fitted = fit_method_router(model, router_blocks(texts, language), old, adapter_name=language, **extra)
    record = {"old_side": old_side, "old_blocks": len(old), "report": asdict(fitted),
              "config": asdict(model.peft_config[language].router), "fit_seconds": time.perf_counter() - start}  # fmt: skip
    if extra:
        record["other_domains"] = list(extra["other_domains"])
    shown = old_side + [f"({o}: other domain)" for o in record.get("other_domains", [])]
    print(f"    router {language} vs {shown}: fitted in {record['fit_seconds']:.0f} s\n{fitted}", flush=True)
    return record


def check_only_trains(model, adapter: str, others: tuple[str, ...]) -> None:
    """Only ``adapter``'s parameters may train (PEFT's ``set_adapter`` freezes the others)."""
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and any(f".{o}." in n for o in others)]
    if wrong:
        raise RuntimeError(f"training {adapter!r} would change another adapter's parameters: {wrong[:3]}")


def run_row(base_model, name: str, texts: dict, reference: dict, sizes, args) -> dict:
    """Train row ``name`` stage by stage from a copy of ``base_model``; its record for results.json."""
    row = ROWS[name]
    routed = row.method in ROUTED_METHODS
    router = (("router", {**dict(row.router_options), "seed": args.seed}),) if routed else ()
    sizes = run.with_scale_options(sizes, (*row.scale_options, *router))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the same initialisation of new weights as run.py's runs
    first = row.languages[0]
    model = prepare_method(row.method, copy.deepcopy(base_model), sizes, adapter_name=first).to(device)
    record = {"method": row.method, "lr": row.lr, "languages": list(row.languages), "replay_fraction": row.replay,
              "stages": []}  # fmt: skip
    for index, language in enumerate(row.languages):
        stage: dict = {"language": language}
        earlier = row.languages[:index]
        if routed:
            if index:
                torch.manual_seed(args.seed)
                model.add_adapter(language, scale_config(row.method, sizes))
            stage["router"] = fit_domain_router(model, texts, language, list(earlier), row.other_domains)
            if earlier:
                together = list(row.languages[: index + 1])
                model.base_model.set_adapter(together)
                confusion = {"before_refit" if row.refit_earlier else "no_refit": peft_confusion(model, texts)}
                if row.refit_earlier:
                    # an earlier router never saw this language: refit it with this language in its old side
                    stage["refitted"] = {
                        other: fit_domain_router(
                            model, texts, other, [o for o in together if o != other], row.other_domains
                        )
                        for other in earlier
                    }
                    confusion["after_refit"] = peft_confusion(model, texts)
                stage["routing_confusion"] = confusion
            model.set_adapter(language)
            check_only_trains(model, language, earlier)
        blocks = texts[language].replay_train if row.replay else texts[language].new_train
        print(f"  {name}: stage {index + 1} ({LANGUAGES[language]}), lr {row.lr:g}", flush=True)
        stage.update(train_stage(model, blocks, row.lr, args, row.w12_lr_ratio, row.scale_optimizer))
        if routed and earlier:
            model.base_model.set_adapter(list(row.languages[: index + 1]))  # every domain's adapter, routed together
        start = time.perf_counter()
        stage["measures"] = stage_measures(model, texts, reference, args)
        stage["seconds"]["evaluate"] = time.perf_counter() - start
        shown = ", ".join(f"{k}={v:.4g}" for k, v in stage["measures"].items() if v is not None)
        print(f"  {name}: after stage {index + 1}: {shown}", flush=True)
        record["stages"].append(stage)
    return record


def peft_confusion(model, texts: dict) -> dict:
    from peft_scale import routing_confusion

    return routing_confusion(model, held_out(texts, CONFUSION_BLOCKS))


# ------------------------------------------------------------------------------------------------ the goals


def goals_of(results: dict) -> dict[str, dict]:
    """Every two-stage row against the issue's goals (see the module docstring); ``None`` where not judged."""
    base = results["base"]
    goals = {}
    for name, record in results["runs"].items():
        if len(record["stages"]) < 2:
            continue
        if name in ROWS:
            reference_name = ROWS[name].reference
        else:  # a row no longer in ROWS (the *_ema_old rows): its reference as its results recorded it
            reference_name = results.get("settings", {}).get("rows", {}).get(name, {}).get("reference", FRENCH_REFERENCE)
        reference = results["runs"].get(reference_name)
        reference_drop = None
        if reference is not None:
            reference_drop = base["fr_perplexity"] - reference["stages"][-1]["measures"]["fr_perplexity"]
        after_es, after_fr = (stage["measures"] for stage in record["stages"])
        spanish_rise = after_fr["es_perplexity"] / after_es["es_perplexity"] - 1
        french_ratio = None
        if reference_drop is not None and reference_drop > 0:
            french_ratio = (base["fr_perplexity"] - after_fr["fr_perplexity"]) / reference_drop
        judged = reference is not None and record["method"] == reference["method"] and french_ratio is not None
        goal = {
            "french_reference": reference_name,
            "spanish_rise": spanish_rise,
            "spanish_kept": spanish_rise <= GOAL_SPANISH_RISE,
            "english_drift": after_fr["drift"],
            "english_drift_met": after_fr["drift"] <= GOAL_DRIFT,
            "french_ratio_to_single_stage_scale": french_ratio,
            "french_learned": (french_ratio >= GOAL_FRENCH) if judged else None,
        }
        judged_goals = (goal["spanish_kept"], goal["english_drift_met"], goal["french_learned"])
        goal["meets_all"] = False if False in judged_goals else (None if None in judged_goals else True)
        goals[name] = goal
    return goals


# ------------------------------------------------------------------------------------------------ the report


def _ppl(value: float, base: float) -> str:
    return f"{value:.2f} ({report.change(value, base):+.1%})"


def _yes(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def write_report(results: dict, output_dir: Path) -> None:
    """results.md and the plots from ``results`` (as written to results.json)."""
    output_dir = Path(output_dir)
    base, goals = results["base"], results["goals"]
    lines = [
        "# Continual pre-training over a sequence: English (base) -> Spanish -> French",
        "",
        f"Machine: {results['machine']}. Settings: `{results['settings']}`.",
        "",
        f"Base model: Spanish ppl {base['es_perplexity']:.2f}, French ppl {base['fr_perplexity']:.2f}, English ppl "
        f"{base['en_perplexity']:.2f}, chat-answer ppl {base['answer_perplexity']:.3f}.",
        "",
        "After each stage (es: after Spanish; fr: after French), held-out text; changes against the base model. Drift:"
        " mean KL(base || adapted) over the English tokens, nats/token. Chat answers: perplexity of the base model's "
        "greedy answers to English chat prompts.",
        "",
        "| row | lr | Spanish ppl after es | Spanish ppl after fr | French ppl after fr | English ppl es / fr "
        "| drift es / fr | chat-answer ppl es / fr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in results["runs"].items():
        stages = {stage["language"]: stage["measures"] for stage in record["stages"]}
        es, fr = stages.get("es"), stages["fr"]
        cells = [
            f"`{name}`", f"{record['lr']:g}",
            "-" if es is None else _ppl(es["es_perplexity"], base["es_perplexity"]),
            _ppl(fr["es_perplexity"], base["es_perplexity"]),
            _ppl(fr["fr_perplexity"], base["fr_perplexity"]),
            ("-" if es is None else f"{es['en_perplexity']:.2f}") + f" / {fr['en_perplexity']:.2f}",
            ("-" if es is None else f"{es['drift']:.3g}") + f" / {fr['drift']:.3g}",
            ("-" if es is None else f"{es['answer_perplexity']:.3f}") + f" / {fr['answer_perplexity']:.3f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The goals",
        "",
        f"Spanish perplexity after French at most {GOAL_SPANISH_RISE:.0%} above after Spanish; English drift after "
        f"French <= {GOAL_DRIFT}; French perplexity drop >= {GOAL_FRENCH:.0%} of the single-stage run's "
        f"(`{FRENCH_REFERENCE}`, or the row's own `reference` at its settings; SCALE only: the other methods have no "
        "single-stage French run here, their ratio to SCALE's is shown, not judged).",
        "",
        "| row | Spanish ppl change es -> fr | kept | English drift after fr | <= 0.02 | French drop / single-stage "
        "SCALE's | >= 90% | meets all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, goal in goals.items():
        ratio = goal["french_ratio_to_single_stage_scale"]
        lines.append(
            f"| `{name}` | {goal['spanish_rise']:+.1%} | {_yes(goal['spanish_kept'])} | {goal['english_drift']:.3g} "
            f"| {_yes(goal['english_drift_met'])} | {'-' if ratio is None else f'{ratio:.0%}'} "
            f"| {_yes(goal['french_learned'])} | {_yes(goal['meets_all'])} |"
        )
    lines += ["", *routing_lines(results), "## Commands", "", *(f"    {c}" for c in results.get("commands", [])), ""]
    lines += ["Plots: " + ", ".join(f"`{name}`" for name in plot_files()), ""]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text("\n".join(lines))
    write_plots(results, output_dir)


def write_plots(results: dict, output_dir: Path) -> None:
    """Each measure over the stages (base, after Spanish, after French) of every row that ran both stages."""
    from benchmarks.plotting import plot_curves

    base = results["base"]
    for key, ylabel in PLOTS.items():
        curves = {}
        for name, record in results["runs"].items():
            if len(record["stages"]) < 2:
                continue
            values = [base[key]] + [stage["measures"][key] for stage in record["stages"]]
            curves[f"{name} (lr {record['lr']:g})"] = {"stage": [0, 1, 2], key: values}
        if curves:
            plot_curves(curves, "stage", key, output_dir / f"stages_{key}.png",
                        title=f"{ylabel}: base (0), after Spanish (1), after French (2)", ylabel=ylabel)  # fmt: skip


PLOTS = {"es_perplexity": "Spanish perplexity", "fr_perplexity": "French perplexity", "drift": "English drift"}


def plot_files() -> list[str]:
    return [f"stages_{key}.png" for key in PLOTS]


def router_description(label: str, record: dict) -> str:
    """One fitted router in the routers' table: its old side, held-out shares, threshold, other domains' shares."""
    r = record["report"]
    text = (f"{label} vs {'+'.join(record['old_side'])}: {r['old_to_base']:.1%} / {r['new_to_expansion']:.1%}, "
            f"threshold {r['threshold']:.4f}")  # fmt: skip
    others = r.get("other_to_expansion") or {}  # (reports made before it existed have none)
    if others:
        text += " (other domains, claimed: " + ", ".join(f"{k} {v:.1%}" for k, v in others.items()) + ")"
    return text


def routing_lines(results: dict) -> list[str]:
    """Where the routed rows' routers send each language's held-out tokens."""
    routed = {name: r for name, r in results["runs"].items() if r["method"] in ROUTED_METHODS}
    if not routed:
        return []
    lines = [
        "## The routers",
        "",
        "Share of each language's held-out tokens routed to the base model after each stage, and the routers' held-out"
        " report (`fit_router`: old tokens kept on the base / new tokens sent to the adapter, threshold; with "
        "`other_domains`, the other language's tokens the router claims).",
        "",
        "| row | stage | Spanish -> base | French -> base | English -> base | routers fitted (old side: held-out old -> base / new -> adapter) |",
        "|---|---|---|---|---|---|",
    ]
    for name, record in routed.items():
        for stage in record["stages"]:
            m = stage["measures"]
            fitted = [(stage["language"], stage["router"])] + [(f"{k} refitted", v) for k, v in stage.get("refitted", {}).items()]
            described = "; ".join(router_description(label, r) for label, r in fitted)
            lines.append(
                f"| `{name}` | {stage['language']} | {m['es_routed_to_preservation']:.1%} | "
                f"{m['fr_routed_to_preservation']:.1%} | {m['en_routed_to_preservation']:.1%} | {described} |"
            )
    for name, record in routed.items():
        for stage in record["stages"]:
            for when, confusion in stage.get("routing_confusion", {}).items():
                lines += [
                    "",
                    f"`{name}`, stage {stage['language']}, routing confusion {CONFUSION_WHEN[when]} (first {CONFUSION_BLOCKS} held-out blocks per language; rows: the text, columns: where "
                    "its tokens went):",
                    "",
                    "| text | " + " | ".join(next(iter(confusion.values()))) + " |",
                    "|---|" + "---|" * len(next(iter(confusion.values()))),
                    *(f"| {text} | " + " | ".join(f"{share:.1%}" for share in shares.values()) + " |"
                      for text, shares in confusion.items()),
                ]  # fmt: skip
    return lines + [""]


# ------------------------------------------------------------------------------------------------ the whole


def base_measures(model, tokenizer, texts: dict, args, cached_answers) -> tuple[dict, dict]:
    """The base model's reference (``run.base_reference``: English log-probabilities, greedy answers) and its
    measures, named as ``stage_measures`` names them."""
    reference, _ = run.base_reference(model, tokenizer, texts["es"], args, cached_answers)
    point = stage_measures(model, texts, reference, args)
    return reference, {k: point[k] for k in ("es_perplexity", "fr_perplexity", "en_perplexity", "drift", "answer_perplexity")}


def finish(results: dict, output_dir: Path) -> None:
    results["goals"] = goals_of(results)
    run.write_json(output_dir / "results.json", results)
    write_report(results, output_dir)


def merge(args) -> dict:
    parts = [json.loads((part / "results.json").read_text()) for part in args.merge_parts]
    settings = joined_settings([part["settings"] for part in parts])  # parts made with more or fewer ROWS
    merged = merge_results([{**part, "settings": settings} for part in parts])
    merged["runs"] = {name: merged["runs"][name] for name in ROWS if name in merged["runs"]}  # ROWS' order
    finish(merged, args.output_dir)
    print(f"merged {len(merged['runs'])} rows into {args.output_dir}")
    return merged


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.merge_parts:
        return merge(args)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.continual_pretraining.sequence " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    model, tokenizer = run.load_model(args.model)
    model = model.to(args.device).eval()
    sizes = run.default_sizes(model.config, args)
    results_path = args.output_dir / "results.json"
    results = load_results(results_path, settings_of(args, sizes))
    texts = build_texts(tokenizer, args)
    reference, base = base_measures(model, tokenizer, texts, args, results.get("base_answers"))
    results.update(machine=run.machine_description(args.device), base=base,
                   base_answers=[vars(a) for a in reference["answers"]])  # fmt: skip
    print(f"Base model: {base}  (setup {time.perf_counter() - started:.0f} s)", flush=True)
    for name in args.rows:
        if name in results["runs"]:
            print(f"{name}: already in {results_path}, skipped", flush=True)
            continue
        print(f"{name}: training", flush=True)
        start = time.perf_counter()
        results["runs"][name] = run_row(model, name, texts, reference, sizes, args)
        if command not in results.setdefault("commands", []):
            results["commands"].append(command)
        finish(results, args.output_dir)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    finish(results, args.output_dir)
    print(f"Results: {results_path}, {args.output_dir / 'results.md'} ({time.perf_counter() - started:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
