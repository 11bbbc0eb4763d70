"""Writes the learned-route adapters saved by peft-scale 0.1.0 (commit d4b1e9f) that tests/test_config.py loads.

Run once, with peft-scale 0.1.0, from the repository root: ``python tests/data/routed_v0.1.0/make.py``. Each
folder holds an adapter (config + weights) on ``tiny_model("llama", num_hidden_layers=4)`` (tests/tiny_models.py),
and ``expected.pt``: the input ids, the base model's logits (to check the base is rebuilt the same) and the
adapter's logits in eval mode, as 0.1.0 computed them.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/

from peft import get_peft_model  # noqa: E402
from tiny_models import perturb_adapter, tiny_model  # noqa: E402

from peft_scale import ScaleConfig, fit_router  # noqa: E402

ADAPTERS = {
    # the 0.1.0 defaults of the learned route
    "defaults": dict(),
    # every router option 0.1.0 had, away from its default
    "options": dict(
        router_hidden=16, router_smoothing=0.8, router_smoothing_fall=0.4, router_smoothing_start="old",
        router_gate="soft", router_preservation_copy=True,
    ),
}


def ids(low, high, n, length, seed):
    return torch.randint(low, high, (n, length), generator=torch.Generator().manual_seed(seed))


def inputs():
    old, new = ids(4, 64, 2, 16, 10), ids(64, 128, 2, 16, 11)
    mixed = torch.cat([new[:, :8], old[:, :8]], 1)  # new text, then old text: the copy and the smoothing act here
    return torch.cat([old, new, mixed])


if __name__ == "__main__":
    for name, options in ADAPTERS.items():
        base = tiny_model("llama", num_hidden_layers=4)
        x = inputs()
        with torch.no_grad():
            base_logits = base(input_ids=x).logits
        torch.manual_seed(0)
        model = get_peft_model(base, ScaleConfig(ffn_expansion=16, variant="route", preserve_layers=2, **options))
        fit_router(model, ids(64, 128, 32, 24, 1), ids(4, 64, 32, 24, 2), progress=False)
        perturb_adapter(model, scale=0.3)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=x).logits
        model.save_pretrained(HERE / name)
        torch.save({"input_ids": x, "base_logits": base_logits, "logits": logits}, HERE / name / "expected.pt")
        print(name, (logits - base_logits).abs().amax(-1).amax(0))
