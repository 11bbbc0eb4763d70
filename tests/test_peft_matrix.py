"""PEFT's own generic test matrix, run on SCALE rows.

PEFT tests every built-in method with one set of generic tests (``testing_common.PeftCommonTester``) over a table of
rows: custom MLP models (``test_custom_models.py``) and tiny decoders (``test_decoder_models.py``). Those tests ship
in PEFT's sdist, not in its wheel: ``.ci/run`` downloads the sdist of the installed peft and points
``PEFT_SCALE_PEFT_TESTS`` at its ``tests`` folder (locally: see CONTRIBUTING.md). Without it this module is skipped.

This module re-runs PEFT's test classes with SCALE's rows in place of PEFT's tables: FFN mode on the MLP models (one
adapter, and two active side by side), FFN mode on tiny Llama, Qwen2, GPT-2 and OPT decoders, and full width on the
Llama and Qwen2 ones. The decoder tests load their models by Hub id; with no Hub,
tiny random models are saved under those ids' relative paths in a folder that is the working directory while they
run, where ``from_pretrained`` finds them. Tests written for one method (LoRA's ``add_weighted_adapter``, ...) are not
part of the matrix and are left out; the generic tests that cannot apply to SCALE are skipped with their reason in
one place, ``NOT_FOR_SCALE``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import peft
import pytest
from tiny_models import tiny_model

from peft_scale import ScaleConfig

PEFT_TESTS = os.environ.get("PEFT_SCALE_PEFT_TESTS")
if not PEFT_TESTS:
    pytest.skip(
        "PEFT's generic tests come from the sdist of the installed peft: `bash .ci/run` downloads it; locally, set "
        "PEFT_SCALE_PEFT_TESTS to its tests folder (CONTRIBUTING.md).",
        allow_module_level=True,
    )


def _import_peft_tests(folder: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """PEFT's ``test_custom_models`` and ``test_decoder_models``, from its ``tests`` folder imported as the package
    ``peft_sdist_tests`` (its modules import each other relatively)."""
    sdist_version = folder.parent.name.rpartition("-")[2]
    if not (folder / "testing_common.py").is_file() or sdist_version != peft.__version__:
        raise RuntimeError(
            f"PEFT_SCALE_PEFT_TESTS={str(folder)!r} is not the tests folder of the sdist of the installed peft "
            f"{peft.__version__} (peft-{peft.__version__}/tests, with testing_common.py): run `bash .ci/run`, or "
            "download and unpack it as CONTRIBUTING.md says."
        )
    pytest.register_assert_rewrite("peft_sdist_tests")  # PEFT's failures show their values, as in PEFT's own runs
    package = types.ModuleType("peft_sdist_tests")
    package.__path__ = [str(folder)]
    sys.modules["peft_sdist_tests"] = package
    # testing_common imports diffusers' StableDiffusionPipeline for its diffusion tests (no SCALE row runs one) and
    # uses it only in an isinstance check. Without diffusers, a class that nothing is an instance of stands in for it,
    # only while PEFT's modules are imported, so that nothing else takes diffusers for installed.
    stand_in = importlib.util.find_spec("diffusers") is None
    if stand_in:
        pipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=pipeline)
    try:
        names = ("test_custom_models", "test_decoder_models")
        return tuple(importlib.import_module(f"peft_sdist_tests.{name}") for name in names)
    finally:
        if stand_in:
            del sys.modules["diffusers"]


custom, decoder = _import_peft_tests(Path(PEFT_TESTS))


# ------------------------------------------------------------------------------------------------- the rows

# FFN mode on PEFT's MLPs (lin0 -> relu -> dropout -> lin1): lin0 is the FFN input, lin1 its output. The other custom
# models are not an FFN of this form: convolutions, attention, an embedding feeding a flattened Conv1D, or a LayerNorm
# between lin0 and lin1 (which would have to be split, as full width splits the norms of a decoder).
MLP_FFN = {"target_modules": ["lin0", "lin1"], "ffn_output_modules": ["lin1"]}
CUSTOM_ROWS = [
    pytest.param("Vanilla MLP 1 SCALE", "MLP", ScaleConfig, {**MLP_FFN, "ffn_expansion": 4}, id="MLP-ffn4"),
    pytest.param(
        "Vanilla MLP 2 SCALE", "MLP", ScaleConfig, {**MLP_FFN, "ffn_expansion": 7, "init": "normal"},
        id="MLP-ffn7-normal",
    ),
    pytest.param("MLP2 SCALE", "MLP2", ScaleConfig, {**MLP_FFN, "ffn_expansion": 8}, id="MLP2-ffn8"),
]
MULTIPLE_ADAPTER_ROWS = [
    pytest.param(
        "SCALE Same",
        "scale",
        ScaleConfig,
        {**MLP_FFN, "ffn_expansion": 4, "init_weights": False},
        {**MLP_FFN, "ffn_expansion": 4, "init_weights": False},
        id="same-widths",
    ),
    pytest.param(
        "SCALE Different",
        "scale",
        ScaleConfig,
        {**MLP_FFN, "ffn_expansion": 4, "init_weights": False},
        {**MLP_FFN, "ffn_expansion": 6, "init": "normal", "init_weights": False},
        id="different-widths",
    ),
]

# Hub id of PEFT's table -> the tiny random model saved under it (tests/tiny_models.py: hidden 32, 2 layers, vocab 128)
FULL_WIDTH_BASES = {
    "trl-internal-testing/tiny-random-LlamaForCausalLM": "llama",
    "peft-internal-testing/tiny-dummy-qwen2": "qwen2",
}
DECODER_BASES = {
    **FULL_WIDTH_BASES,
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": "gpt2",
    "peft-internal-testing/tiny-random-OPTForCausalLM": "opt",
}
FFN_ROWS = [
    pytest.param(ScaleConfig, {"task_type": "CAUSAL_LM", "ffn_expansion": 8}, id="ffn"),
    pytest.param(
        ScaleConfig, {"task_type": "CAUSAL_LM", "ffn_expansion": 5, "preserve_layers": 1}, id="ffn-upper-layer"
    ),
]
FULL_WIDTH_ROWS = [
    pytest.param(ScaleConfig, {"task_type": "CAUSAL_LM", "ffn_expansion": 8, "hidden_expansion": 16}, id="full-width"),
    pytest.param(
        ScaleConfig,
        {"task_type": "CAUSAL_LM", "ffn_expansion": 8, "hidden_expansion": 16, "variant": "preserve"},
        id="full-width-preserve",
    ),
]

# PEFT's generic tests that cannot apply to SCALE: test -> (the rows, why). The one place they are listed.
FULL_WIDTH = ("full-width", "full-width-preserve")
NOT_FOR_SCALE: dict[str, tuple[tuple[str, ...], str]] = {
    "test_merge_layers": (
        FULL_WIDTH,
        "it saves the merged model as a checkpoint of its architecture, whose single norm per layer cannot hold full "
        "width's split norms; saving it is refused with an error that says so (test_merge.py)",
    ),
    "test_prepare_for_training_parametrized": (
        FULL_WIDTH,
        "it asserts that the input embedding's output needs no gradient, but full width trains the embedding's new "
        "columns E_up (where the new slice of the residual stream comes from)",
    ),
    "test_training_decoders_layer_indexing": (
        FULL_WIDTH,
        "full width widens the residual stream of every layer, so layers_to_transform cannot apply (an error says so)",
    ),
}


# ------------------------------------------------------------------------------------------------- the harness


def _scale_rows(test_name: str, rows: list) -> list:
    """``rows`` for one test, those ``NOT_FOR_SCALE`` names for it marked to skip with the reason."""
    skipped, reason = NOT_FOR_SCALE.get(test_name, ((), ""))
    skip = pytest.mark.skip(reason=f"not for SCALE: {reason}")
    return [
        pytest.param(*row.values, id=row.id, marks=[*row.marks, skip]) if getattr(row, "id", None) in skipped else row
        for row in rows
    ]


def _on_scale_rows(tester: type, tables: dict[int, list]) -> dict:
    """Class attributes that re-run ``tester``'s tests on SCALE's rows: every test parametrized over one of PEFT's
    tables (``tables``: ``id(table)`` -> SCALE's rows) gets the same parametrization over SCALE's rows; every other
    test of the class (written for one method) is left out."""
    attributes = {}
    for name in dir(tester):
        if not name.startswith("test_"):
            continue
        test = getattr(tester, name)
        marks = getattr(test, "pytestmark", [])
        if not any(mark.name == "parametrize" and id(mark.args[1]) in tables for mark in marks):
            attributes[name] = None  # not a test of the matrix: not collected
            continue
        copy = types.FunctionType(test.__code__, test.__globals__, name, test.__defaults__, test.__closure__)
        copy.__kwdefaults__, copy.__qualname__ = test.__kwdefaults__, f"{tester.__name__}.{name}"
        copy.pytestmark = [
            pytest.mark.parametrize(mark.args[0], _scale_rows(name, tables[id(mark.args[1])]), **mark.kwargs).mark
            if mark.name == "parametrize" and id(mark.args[1]) in tables
            else mark
            for mark in marks
        ]
        attributes[name] = copy
    return attributes


def _scale_test_class(name: str, tester: type, tables: dict[int, list]) -> type:
    return type(name, (tester,), _on_scale_rows(tester, tables))


TestScaleOnCustomModels = _scale_test_class(
    "TestScaleOnCustomModels", custom.TestPeftCustomModel, {id(custom.TEST_CASES): CUSTOM_ROWS}
)
TestScaleMultipleActiveAdapters = _scale_test_class(
    "TestScaleMultipleActiveAdapters",
    custom.TestMultipleActiveAdapters,
    {id(custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): MULTIPLE_ADAPTER_ROWS},
)


@pytest.fixture(scope="class")
def tiny_decoders_under_hub_ids(tmp_path_factory):
    """The working directory, while the decoder tests run, is a folder holding the tiny decoders under their Hub ids."""
    folder = tmp_path_factory.mktemp("hub_ids")
    for model_id, model_type in DECODER_BASES.items():
        tiny_model(model_type).save_pretrained(folder / model_id)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder


decoder_tables = (id(decoder.PEFT_DECODER_MODELS_TO_TEST), id(decoder.ALL_CONFIGS))
TestScaleFfnOnDecoders = pytest.mark.usefixtures("tiny_decoders_under_hub_ids")(
    _scale_test_class(
        "TestScaleFfnOnDecoders", decoder.TestDecoderModels, dict(zip(decoder_tables, [list(DECODER_BASES), FFN_ROWS]))
    )
)
TestScaleFullWidthOnDecoders = pytest.mark.usefixtures("tiny_decoders_under_hub_ids")(
    _scale_test_class(
        "TestScaleFullWidthOnDecoders",
        decoder.TestDecoderModels,
        dict(zip(decoder_tables, [list(FULL_WIDTH_BASES), FULL_WIDTH_ROWS])),
    )
)
