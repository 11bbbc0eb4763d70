"""What the learned router costs: in a training step, and in unmerged inference against the base model.

Run from the repository root::

    PYTHONPATH=. python benchmarks/router_cost.py --model tiny            # ~1 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/router_cost.py --model smollm2_shape   # SmolLM2-135M's shapes, random weights
    PYTHONPATH=. python benchmarks/router_cost.py --quick                 # seconds: smoke run

Rows (the same base model, sizes and workloads as ``benchmarks/throughput.py``, whose timing helpers this uses):

- ``scale_ffn_upper``: SCALE-FFN with ``k`` new neurons in the layers from ``preserve_layers`` up, no router.
- ``scale_ffn_routed``: the same widening with the learned router (``RouterConfig``'s defaults but
  ``preservation_copy=False``; fitted once on random ids; its decisions do not change what is computed, only what is
  added).
- ``router``: the router alone (``TokenRouter`` on a ``batch x seq x d`` stream), forward only, as it runs inside
  each step.

Goals (issue 11): ``router / scale_ffn_routed step <= 2%``; routed unmerged inference ``<= 1.15x`` the base model
(prefill and decode). ``scale_ffn_routed / scale_ffn_upper`` is the whole price of routing in a step (the router,
the hook, the gate products), within the run-to-run noise (~5%) of a CPU.

Inference is timed twice, with the router's threshold set so that its decisions are known: ``new text`` (threshold 0:
every token to the expansion, the most work) and ``old text`` (threshold above 1: every token to the base model). An
inference pass that sends no token to an FFN-mode adapter skips its products (``peft_scale.gate_hook``: the widened
MLPs compute as their base layers); ``old text, no skip`` times the same pass with the skip turned off
(``Routing.skip_idle = False``), the cost before it. A pass with some tokens for the expansion computes it for all of
them (their contribution is multiplied by the gate's zeros): skipping per token would need a gather of the routed
tokens per layer, which is not implemented. ``unrouted`` is ``scale_ffn_upper`` in inference: the widening's own
price, and ``routed ... /unrouted`` what routing adds to it.

``scale_ffn_routed_copy`` / ``_copy_old`` are new and old text with ``RouterConfig(preservation_copy=True)``
(``peft_scale.preservation_copy``): on new text the layers from ``preserve_layers`` up run on twice the rows (the
worst case: any sequence with a token routed to the expansion pays it); on old text the copy is not carried.
``copy ... new_text/routed`` is the copy's own price (the copy is ``RouterConfig``'s default; it has no goal here).

``scale_ffn_routed_node`` is new text with the widened layers' autograd node built without grad too, as before
``widened_linear`` had its no-grad path: ``routed ... with_node/without`` is what that path saves.

The inference rows are timed in turn (``throughput.bench_inference_interleaved``: every repeat runs each row once,
in a rotated order), and each inference ratio is the median over repeats of the ratio of two rows' times *within*
one repeat (``paired_ratios`` in the JSON has every one). On a 2-core CPU decode times shift by 10-40% over minutes
(one SmolLM2 run: 3.1 s per decode in its first four repeats, 2.2 s in the last five, every row alike). Timed one
row after the other, such a shift lands on whichever row ran then, and the ratio of medians of rows timed in turn
still mixes regimes when the shift falls mid-run; the ratio within a repeat does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.throughput import (  # noqa: E402
    WORKLOADS,
    bench_inference_interleaved,
    bench_training,
    build_base,
    expansion_sizes,
    machine_info,
    precision_context,
    scale_model,
    summarise,
    time_runs,
)
import peft_scale.layer as layer_module  # noqa: E402
from peft_scale.widened_linear import WidenedLinear, widened_linear  # noqa: E402

OUTPUT_DIR = REPO / "benchmarks" / "results"


def with_node(x, weight, bias, w12=None, w21=None, b21=None, w22=None, gate=None):
    """``widened_linear`` as it was before its no-grad path: the autograd node, with or without grad."""
    return WidenedLinear.apply(x, weight, bias, w12, w21, b21, w22, gate)


def routed_models(base, sizes: dict):
    """(SCALE-FFN widened from preserve_layers up, the same with the learned router fitted on random ids)."""
    import peft_scale
    from peft_scale import RouterConfig

    k, fp = sizes["ffn_expansion"], sizes["preserve_layers"]
    layers = list(range(fp, base.config.num_hidden_layers))
    plain = scale_model(base, ffn_expansion=k, layers_to_transform=layers)
    # RouterConfig's defaults but the preservation copy, which the rows turn on where they say so
    routed = scale_model(base, ffn_expansion=k, preserve_layers=fp, router=RouterConfig(preservation_copy=False))
    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    new = torch.randint(vocab // 2, vocab, (8, 32), generator=generator)
    old = torch.randint(3, vocab // 2, (8, 32), generator=generator)
    peft_scale.fit_router(routed, new, old, progress=False)
    return plain, routed


def router_alone(routed, batch: int, seq: int, warmup: int, repeats: int) -> dict:
    router = routed.base_model.scale_router["default"]
    hidden = torch.randn(batch, seq, router.features)
    with torch.no_grad():
        return summarise(time_runs(lambda: router(hidden), warmup, repeats, torch.device("cpu")), batch * seq)


def run(model: str, quick: bool, seed: int = 0, repeats: Optional[int] = None) -> dict:
    workload = dict(WORKLOADS["quick" if quick else model])
    if repeats is not None:  # more timed runs per row: CPU decode times vary by 10-20% from run to run
        workload["repeats"] = repeats
    batch, seq, decode_tokens = workload["batch"], workload["seq"], workload["decode_tokens"]
    warmup, repeats = workload["warmup"], workload["repeats"]
    dtype, device = torch.float32, torch.device("cpu")
    precision = precision_context(device, dtype)
    base = build_base(model, dtype, seed)
    sizes = expansion_sizes(base.config)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=generator)
    prompt = ids[:, :8]
    plain, routed = routed_models(base, sizes)
    train = {
        name: bench_training(model_, ids, warmup, repeats, precision)
        for name, model_ in (("scale_ffn_upper", plain), ("scale_ffn_routed", routed))
    }
    router = router_alone(routed, batch, seq, warmup, max(repeats, 20))
    router_state = routed.base_model.scale_router["default"].threshold
    routing = routed.base_model._routing

    def routed_as(threshold: float, skip: bool, node: bool = False, copy: bool = False):
        def setup():  # 0: every token to the expansion (new text); 2: every token to the base model (old text)
            router_state.fill_(threshold)
            routing.skip_idle = skip
            routed.peft_config["default"].router.preservation_copy = copy
            # node=True: the widened layers build their autograd node without grad too, as before the no-grad path
            layer_module.widened_linear = with_node if node else widened_linear
        return setup

    infer = bench_inference_interleaved(
        {
            "base": (base, None),
            # the same widening, unrouted (what routing adds to it); its setup undoes the previous row's forced node
            "scale_ffn_upper": (plain, routed_as(0.0, True)),
            "scale_ffn_routed": (routed, routed_as(0.0, True)),
            "scale_ffn_routed_node": (routed, routed_as(0.0, True, node=True)),
            "scale_ffn_routed_old": (routed, routed_as(2.0, True)),
            "scale_ffn_routed_old_no_skip": (routed, routed_as(2.0, False)),
            "scale_ffn_routed_copy": (routed, routed_as(0.0, True, copy=True)),
            "scale_ffn_routed_copy_old": (routed, routed_as(2.0, True, copy=True)),
        },
        ids, prompt, decode_tokens, warmup, repeats, precision,
    )  # fmt: skip
    routing.skip_idle = True
    routed.peft_config["default"].router.preservation_copy = False
    layer_module.widened_linear = widened_linear
    step = train["scale_ffn_routed"]["median_s"]
    ratios = {
        "router/step": router["median_s"] / step,
        "scale_ffn_routed/scale_ffn_upper": step / train["scale_ffn_upper"]["median_s"],
    }
    paired = {}  # each inference ratio: the median over repeats of the ratio within one repeat (rows timed in turn)
    rows = {
        "routed_{phase}_new_text/base": ("scale_ffn_routed", "base"),
        "routed_{phase}_old_text/base": ("scale_ffn_routed_old", "base"),
        "routed_{phase}_old_no_skip_text/base": ("scale_ffn_routed_old_no_skip", "base"),
        "unrouted_{phase}/base": ("scale_ffn_upper", "base"),  # the widening alone
        "routed_{phase}_new_text/unrouted": ("scale_ffn_routed", "scale_ffn_upper"),  # what routing adds to it
        "routed_{phase}_with_node/without": ("scale_ffn_routed_node", "scale_ffn_routed"),  # what the no-grad path saves
        # RouterConfig.preservation_copy (no goal): carried while a token went to the expansion, skipped on old text
        "copy_{phase}_new_text/base": ("scale_ffn_routed_copy", "base"),
        "copy_{phase}_old_text/base": ("scale_ffn_routed_copy_old", "base"),
        "copy_{phase}_new_text/routed": ("scale_ffn_routed_copy", "scale_ffn_routed"),  # the copy's own price
    }
    for name, (row, reference) in rows.items():
        for phase in ("prefill", "decode"):
            within = [a / b for a, b in zip(infer[row][phase]["samples_s"], infer[reference][phase]["samples_s"])]
            paired[name.format(phase=phase)] = within
            ratios[name.format(phase=phase)] = statistics.median(within)
    goals = {"router/step": 0.02, **{f"routed_{phase}_{text}_text/base": 1.15 for phase in ("prefill", "decode") for text in ("new", "old")}}
    for row in train.values():
        row.pop("memory", None)
    return dict(
        model=model, quick=quick, machine=machine_info(device), sizes=sizes,
        workload=dict(batch=batch, seq=seq, decode_tokens=decode_tokens, warmup=warmup, repeats=repeats),
        train=train, router=router, inference=infer, ratios=ratios, paired_ratios=paired,
        goals={name: {"goal": goal, "met": ratios[name] <= goal} for name, goal in goals.items()},
    )  # fmt: skip


def format_table(result: dict) -> str:
    lines = [
        f"Router cost, {result['model']} ({result['machine'].get('cpu', 'cpu')}), batch {result['workload']['batch']} "
        f"x {result['workload']['seq']} tokens, fp32",
        "",
        "| ratio | measured | goal |",
        "|---|---|---|",
    ]
    for name, value in result["ratios"].items():
        goal = result["goals"].get(name)
        shown = f"{value:.2%}" if name == "router/step" else f"{value:.3f}"
        target = "-" if goal is None else (f"<= {goal['goal']:.0%}" if name == "router/step" else f"<= {goal['goal']}")
        lines.append(f"| {name} | {shown} | {target}{'' if goal is None else (' met' if goal['met'] else ' MISSED')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2_shape", "smollm2"), default="tiny")
    parser.add_argument("--quick", action="store_true", help="smoke run: the 'quick' workload")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: the workload's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.quick, repeats=args.repeats)
    print(format_table(result))
    output = args.output or OUTPUT_DIR / f"router_cost_{args.model}{'_quick' if args.quick else ''}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"JSON: {output}")
    return result


if __name__ == "__main__":
    main()
