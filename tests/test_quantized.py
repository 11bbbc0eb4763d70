"""SCALE on bitsandbytes 4-bit and 8-bit bases (QLoRA-style), on the CPU (``peft_scale/quantized.py``).

A tiny 4-layer Llama is saved once in fp32 and loaded the way a user loads a large one,
``from_pretrained(path, quantization_config=BitsAndBytesConfig(...), device_map="cpu")``, in every supported
quantization: nf4 and fp4, with and without double quantisation, and LLM.int8(). The frozen path is the quantized
layer itself, so the logits at initialisation equal the quantized base model's exactly, and training leaves every
quantized tensor bit-identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import run_in_fresh_process
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import perturb_adapter, random_ids, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_scale import ScaleConfig, ScaleLayer, fit_router
from peft_scale.quantized import bnb_kind, weight_rows

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed: pip install 'peft-scale[quant]' (the test extras have it)"
)

LAYERS, EXPANSION = 4, 8
QUANTS = {  # name -> BitsAndBytesConfig kwargs
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
MODES = {
    "ffn": dict(ffn_expansion=EXPANSION),
    "full_width": dict(hidden_expansion=16, ffn_expansion=EXPANSION),
}

# bitsandbytes 0.50 runs a 4-bit layer on a CPU with AVX512-BF16 through another kernel once it has repacked the
# weight, which it does in place at the layer's first no-grad forward in eval mode: other numbers than its
# dequantising path (the one training takes), and a crash on a layer narrower than one 64-block (this model's hidden
# 32: "shape '[32, 0]' is invalid") or whose out_features is not a multiple of 32. So that the tests compare like with
# like on every CPU, they pin the dequantising path (the kernel of CPUs without the extension, where these tests were
# written); test_on_the_repacking_kernel_... runs SCALE on the other one where the CPU has it.
HAS_AVX512_BF16 = bnb.functional.has_avx512bf16()
ONE_KERNEL = "import bitsandbytes.nn.modules; bitsandbytes.nn.modules.has_avx512bf16 = lambda: False"


@pytest.fixture(scope="module", autouse=True)
def one_bitsandbytes_kernel():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
        yield


pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),  # bitsandbytes casts fp32 inputs to fp16
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),  # PEFT calls it
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny 4-layer Llama (hidden 32, FFN 64) saved in fp32."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(num_hidden_layers=LAYERS).save_pretrained(path)
    return str(path)


def load(checkpoint: str, quant=None):
    """The checkpoint as a user loads it: quantized by bitsandbytes on the CPU (``quant``), or in fp32."""
    quantization = BitsAndBytesConfig(**QUANTS[quant]) if quant else None
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization, device_map="cpu").eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def base_name(name: str) -> str:
    """The base model's name of a module or parameter of the PEFT model."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of every tensor that holds a quantized weight: the packed data, the 4-bit block scales (and their own
    quantization under double quantisation), the 8-bit row scales; keyed by the base model's names."""
    tensors = {}
    for name, module in model.named_modules():
        name = base_name(name)
        kind = bnb_kind(module) if isinstance(module, nn.Linear) else None
        if kind == "4bit":
            state = module.weight.quant_state
            tensors[f"{name}.data"] = module.weight.data
            tensors[f"{name}.absmax"] = state.absmax
            if state.nested:
                tensors[f"{name}.nested_absmax"], tensors[f"{name}.offset"] = state.state2.absmax, state.offset
        elif kind == "8bit":
            tensors[f"{name}.data"] = module.weight.data
            tensors[f"{name}.SCB"] = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return {name: t.clone() for name, t in tensors.items()}


def train(model, steps: int = 5, lr: float = 1e-2, seed: int = 0):
    """A few AdamW steps on random text."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = random_ids(batch=4, length=16, seed=100 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -------------------------------------------------------------------------------------------- 1. injection


@pytest.mark.parametrize("quant", QUANTS)
def test_sizes_come_from_the_layers_features_and_the_blocks_are_fp32(checkpoint, quant):
    model = get_peft_model(load(checkpoint, quant), ScaleConfig(ffn_expansion=EXPANSION))
    mlp = model.base_model.model.model.layers[0].mlp
    kind = bnb.nn.Linear4bit if quant != "int8" else bnb.nn.Linear8bitLt
    for name, (out, inp) in {"gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}.items():
        layer = getattr(mlp, name)
        assert isinstance(layer, ScaleLayer) and type(layer.base_layer) is kind  # the quantized layer, unchanged
        assert (layer.out_features, layer.in_features) == (out, inp)
        assert not layer._takes_one_node()  # the quantized layer's own forward: the general path
    assert mlp.gate_proj.scale_w21["default"].shape == (EXPANSION, 32)
    assert mlp.down_proj.scale_w12["default"].shape == (32, EXPANSION)
    assert model.peft_config["default"].base_ffn_shapes == [[32, 64]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


@pytest.mark.parametrize("quant", QUANTS)
def test_svd_init_reads_the_dequantised_weight(checkpoint, quant):
    """W21's rows lie in the top-``EXPANSION`` right singular subspace of the dequantised W (not of the packed bytes),
    and that W is the real matrix up to the quantization error."""
    model = get_peft_model(load(checkpoint, quant), ScaleConfig(ffn_expansion=EXPANSION))
    mlp = model.base_model.model.model.layers[0].mlp
    gate = mlp.gate_proj
    rows = weight_rows(gate.base_layer).float()
    assert rows.shape == (64, 32)
    # the real matrix up to the quantization error, on down_proj (rows of 64 = whole 4-bit blocks): on an AVX512-BF16
    # CPU (measured 2026-12-02) bitsandbytes' dequantisation gave some entries of a layer narrower than one block
    # (gate_proj here, 32 wide; no real model has one) another block's scale, in its own forward as in weight_rows
    down, original = weight_rows(mlp.down_proj.base_layer).float(), load(checkpoint).model.layers[0].mlp.down_proj.weight
    assert gap(down, original) <= 0.25 * original.abs().max()
    v = torch.linalg.svd(rows, full_matrices=False).Vh[:EXPANSION].T  # (32, EXPANSION)
    w21 = gate.scale_w21["default"].detach()
    outside = w21 - (w21 @ v) @ v.T
    assert outside.norm() <= 1e-4 * w21.norm()


def test_a_weight_bitsandbytes_repacked_for_avx512_bf16_cpus_is_unpacked_before_dequantising(checkpoint):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first no-grad forward in eval mode (block
    scales in bf16); reading it unpacks it as bitsandbytes' own save does."""
    from bitsandbytes import functional

    layer = load(checkpoint, "nf4").model.layers[0].mlp.down_proj  # (32, 64): rows of whole 64-blocks, as it needs
    expected = weight_rows(layer).clone()
    layer.weight.data, layer.weight.quant_state = functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    torch.testing.assert_close(weight_rows(layer), expected, rtol=1e-2, atol=1e-3)  # bf16 block scales
    assert not layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_on_the_repacking_kernel_scale_at_init_gives_the_quantized_base_models_logits(tmp_path, monkeypatch):
    """Where bitsandbytes repacks (this CPU has AVX512-BF16): a model whose every in_features is a multiple of 64
    and out_features of 32, as real models' are, loaded in nf4; SCALE-FFN (32 new neurons, SVD-initialised from the
    dequantised weight before any forward) gives the quantized base model's logits exactly, both on the repacked
    kernel, and the adapter's layers hold the repacked weight afterwards."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", bnb.functional.has_avx512bf16)  # the CPU's own kernel
    tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    ids = random_ids()
    base = load(str(tmp_path), "nf4")
    model = get_peft_model(load(str(tmp_path), "nf4"), ScaleConfig(ffn_expansion=32))
    assert torch.equal(logits(model, ids), logits(base, ids))
    gate = model.base_model.model.model.layers[0].mlp.gate_proj.base_layer
    assert gate.weight.quant_state.packing_format_for_cpu  # the repacked kernel ran
    perturb_adapter(model, scale=0.5)
    assert gap(logits(model, ids), logits(base, ids)) > 1e-3


# ----------------------------------------------------------------------------------------- 2. preservation


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant", QUANTS)
def test_init_logits_equal_the_quantized_base_models(checkpoint, quant, mode):
    ids = random_ids()
    expected = logits(load(checkpoint, quant), ids)
    model = get_peft_model(load(checkpoint, quant), ScaleConfig(**MODES[mode]))
    assert torch.equal(logits(model, ids), expected)


TRAINED = [(quant, "ffn") for quant in QUANTS] + [("nf4", "full_width"), ("int8", "full_width")]


@pytest.mark.parametrize("quant,mode", TRAINED)
def test_training_moves_the_logits_and_only_the_scale_blocks(checkpoint, quant, mode):
    """QLoRA's recipe: prepare_model_for_kbit_training (gradient checkpointing on), then a few optimizer steps."""
    ids = random_ids()
    # reentrant checkpointing: the variant that needs the inputs' gradients switched on
    checkpointing = {"use_reentrant": True}
    base = prepare_model_for_kbit_training(load(checkpoint, quant), gradient_checkpointing_kwargs=checkpointing)
    expected = logits(base, ids)
    quantized = quantized_tensors(base)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters() if p.dtype.is_floating_point}
    model = get_peft_model(base, ScaleConfig(**MODES[mode]))
    assert model.base_model.model.is_gradient_checkpointing
    scale = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert scale and all(".scale_" in name for name in scale)

    train(model)
    assert gap(logits(model, ids), expected) > 1e-3
    after = quantized_tensors(model)
    assert after.keys() == quantized.keys() and all(torch.equal(after[k], quantized[k]) for k in quantized)
    params = dict(model.named_parameters())
    now = {base_name(name): p for name, p in params.items()}
    assert all(torch.equal(now[name], value) for name, value in frozen.items())  # norms, embedding, LM head
    assert all(not torch.equal(params[name], value) for name, value in scale.items() if "scale_w12" in name)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_the_learned_route_on_a_quantized_base(checkpoint, quant):
    """Old-domain text (ids 4-63) routed to the base model gets the quantized base model's logits exactly, after the
    expansion has moved; new-domain text (64-127) goes to the expansion."""
    generator = torch.Generator().manual_seed(0)
    new = torch.randint(64, 128, (64, 48), generator=generator)
    old = torch.randint(4, 64, (64, 48), generator=generator)
    base = load(checkpoint, quant)
    model = get_peft_model(load(checkpoint, quant), ScaleConfig(ffn_expansion=16, variant="route", preserve_layers=2))
    fit_router(model, new, old, progress=False)
    ids = random_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))  # W12 still zero
    perturb_adapter(model, scale=0.5)
    old_text = torch.randint(4, 64, (4, 16), generator=generator)
    new_text = torch.randint(64, 128, (4, 16), generator=generator)
    assert torch.equal(logits(model, old_text), logits(base, old_text))
    assert model.base_model.last_routing.to_preservation.all()
    assert gap(logits(model, new_text), logits(base, new_text)) > 1e-2
    assert not model.base_model.last_routing.to_preservation.any()


# ------------------------------------------------------------------------------------------- 3. save / load


@pytest.fixture(scope="module")
def trained_adapters(checkpoint, tmp_path_factory) -> dict:
    """quant -> (folder of an adapter trained on that quantized base, its logits on ``random_ids()``)."""
    out = {}
    for quant in ("nf4", "fp4_double", "int8"):
        model = train(get_peft_model(load(checkpoint, quant), ScaleConfig(ffn_expansion=EXPANSION)))
        folder = tmp_path_factory.mktemp(f"adapter_{quant}")
        model.save_pretrained(folder)
        out[quant] = (str(folder), logits(model, random_ids()))
    return out


def test_save_and_load_onto_the_quantized_base_in_a_fresh_process(checkpoint, trained_adapters):
    folders = {}
    for quant, (folder, expected) in trained_adapters.items():
        torch.save(expected, f"{folder}/expected.pt")
        folders[quant] = folder
    out = run_in_fresh_process(
        f"""
import torch, peft_scale
{ONE_KERNEL}
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from tiny_models import random_ids
quants = {QUANTS!r}
for quant, folder in {folders!r}.items():
    base = AutoModelForCausalLM.from_pretrained(
        {checkpoint!r}, quantization_config=BitsAndBytesConfig(**quants[quant]), device_map="cpu")
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        same = torch.equal(model(input_ids=random_ids()).logits, torch.load(folder + "/expected.pt"))
    print(quant, same)
"""
    )
    assert dict(line.split() for line in out.strip().splitlines()) == dict.fromkeys(folders, "True")


@pytest.mark.parametrize("quant", ["nf4", "fp4_double", "int8"])
def test_an_adapter_trained_on_a_quantized_base_loads_on_the_unquantized_base(checkpoint, trained_adapters, quant):
    """Served on the fp32 base, the adapter does what it did on the quantized one, up to the quantization error.

    Measured here (max |logit difference| on ``random_ids()``; this model's logits reach 0.43): the fp32 and the
    quantized bases differ by 0.042 (nf4), 0.062 (fp4, double quantisation), 0.003 (int8); the adapter's effect
    (adapted minus base logits: 0.08, 0.08, 0.08) differs between the two bases by 0.009, 0.010, 0.003, so the
    adapted models differ by about what the bases do (0.044, 0.060, 0.004)."""
    folder, on_quantized = trained_adapters[quant]
    ids = random_ids()
    model = PeftModel.from_pretrained(load(checkpoint), folder).eval()
    saved = PeftModel.from_pretrained(load(checkpoint, quant), folder)
    expected = {n: p for n, p in saved.named_parameters() if ".scale_" in n}
    loaded = {n: p for n, p in model.named_parameters() if ".scale_" in n}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[n], expected[n]) for n in expected)

    base_q, base_fp = logits(load(checkpoint, quant), ids), logits(load(checkpoint), ids)
    on_full = logits(model, ids)
    effect_q, effect_fp = on_quantized - base_q, on_full - base_fp
    assert gap(effect_q, 0) > 1e-2
    assert gap(effect_fp, effect_q) <= 0.25 * gap(effect_q, 0)
    assert gap(on_full, on_quantized) <= gap(base_fp, base_q) + gap(effect_fp, effect_q)


def test_an_adapter_trained_on_the_unquantized_base_loads_on_a_quantized_base(checkpoint, tmp_path):
    model = train(get_peft_model(load(checkpoint), ScaleConfig(ffn_expansion=EXPANSION)))
    model.save_pretrained(tmp_path)
    quantized = PeftModel.from_pretrained(load(checkpoint, "nf4"), tmp_path)
    ids = random_ids()
    base_q, base_fp = logits(load(checkpoint, "nf4"), ids), logits(load(checkpoint), ids)
    effect_fp, effect_q = logits(model, ids) - base_fp, logits(quantized, ids) - base_q
    assert gap(effect_q, effect_fp) <= 0.25 * gap(effect_fp, 0)


# ---------------------------------------------------------------------------------------------- 4. merging


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_and_unload_dequantises_merges_and_requantises(checkpoint, quant, tmp_path):
    """The merged model is a quantized model of the base's settings with intermediate_size + EXPANSION; it differs
    from the unmerged one by requantising the widened matrices (less than quantizing the base cost), and saves and
    loads as a plain bitsandbytes checkpoint."""
    ids = random_ids()
    model = train(get_peft_model(load(checkpoint, quant), ScaleConfig(ffn_expansion=EXPANSION)))
    unmerged = logits(model, ids)
    original = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    with pytest.warns(UserWarning, match="requantis"):
        merged = model.merge_and_unload()
    assert merged.config.intermediate_size == 64 + EXPANSION
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(merged.model.layers[0].mlp, name)
        assert type(layer) is type(original) and bnb_kind(layer) == bnb_kind(original)
        assert (layer.out_features, layer.in_features) == ((32, 72) if name == "down_proj" else (72, 32))
        if bnb_kind(layer) == "4bit":
            for setting in ("quant_type", "compress_statistics", "blocksize"):
                assert getattr(layer.weight, setting) == getattr(original.weight, setting)
    # compared on the mean absolute logit change: the largest single change is one extreme of 8,192 logits, which the
    # int8 path's fp16 cast of the activations dominates (on an Intel Xeon: largest 0.00325 merging, 0.00300
    # quantizing; mean 0.00042 and 0.00058; the 4-bit kinds are 3-6x apart on both)
    merged_logits, base_q, base_fp = logits(merged, ids), logits(load(checkpoint, quant), ids), logits(load(checkpoint), ids)
    merging_gap, quantization_gap = (merged_logits - unmerged).abs().mean(), (base_q - base_fp).abs().mean()
    assert 0 < merging_gap <= quantization_gap, (merging_gap, quantization_gap)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert bnb_kind(reloaded.model.layers[0].mlp.down_proj) == bnb_kind(original)
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merging_full_width_into_a_quantized_base_is_an_error_that_says_how_to_merge(checkpoint, quant, tmp_path):
    """Requantising every widened projection moved a trained full-width model's logits by 0.03-0.24 in nf4 (the base's
    quantization: 0.04), so it is refused; the adapter merges on the fp32 base instead."""
    ids = random_ids()
    model = train(get_peft_model(load(checkpoint, quant), ScaleConfig(**MODES["full_width"])), steps=2)
    refused = "full-width SCALE adapter into a bitsandbytes-quantized base.*PeftModel.from_pretrained"
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=refused):
            merge()
    assert not any(isinstance(m, ScaleLayer) and m.merged for m in model.modules())
    model.save_pretrained(tmp_path)
    on_full = PeftModel.from_pretrained(load(checkpoint), tmp_path)
    unmerged = logits(on_full, ids)
    assert gap(logits(on_full.merge_and_unload(), ids), unmerged) <= 1e-5


def test_unmerging_gives_the_quantized_layers_back_exactly(checkpoint):
    ids = random_ids()
    model = get_peft_model(load(checkpoint, "nf4"), ScaleConfig(ffn_expansion=EXPANSION))
    perturb_adapter(model, scale=0.05)
    unmerged = logits(model, ids)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    original = down.base_layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    assert down.merged and down.base_layer is not original
    model.unmerge_adapter()
    assert down.base_layer is original and torch.equal(logits(model, ids), unmerged)


# ----------------------------------------------------------------------------------------- 5. unsupported


class FakeQuantizedTensor(torch.Tensor):
    """Stands in for a quantizing tensor subclass (torchao's AffineQuantizedTensor, optimum-quanto's QTensor)."""


class QuantLinear(nn.Module):
    """Stands in for a GPTQ/AWQ layer: packed integer weights, its own forward, not an nn.Linear."""

    def __init__(self, module: nn.Linear):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(module.in_features // 8, module.out_features, dtype=torch.int32))
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _quantized_by_gptq(model):
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}


def _int8_weight(model):
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)


def _float8_weight(model):
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)


def _tensor_subclass_weight(model):
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(FakeQuantizedTensor), requires_grad=False)


def _quant_linear(model):
    model.model.layers[1].mlp.down_proj = QuantLinear(model.model.layers[1].mlp.down_proj)


@pytest.mark.parametrize(
    "quantize,error,message",
    [
        (_quantized_by_gptq, ValueError, "cannot widen a model quantized with 'gptq'.*Supported: .*bitsandbytes"),
        (_int8_weight, TypeError, "layers.1.mlp.down_proj.*torch.int8.*Supported: .*bitsandbytes"),
        (_float8_weight, TypeError, "down_proj.*float8_e4m3fn.*Supported: .*bitsandbytes"),
        (_tensor_subclass_weight, TypeError, "down_proj.*FakeQuantizedTensor.*Supported: .*bitsandbytes"),
        (_quant_linear, TypeError, "got QuantLinear at 'model.layers.1.mlp.down_proj'.*Supported: .*bitsandbytes"),
    ],
)
def test_a_base_quantized_by_something_else_is_a_clear_error(quantize, error, message):
    model = tiny_llama(num_hidden_layers=2)
    quantize(model)
    before = list(model.state_dict())
    with pytest.raises(error, match=message):
        get_peft_model(model, ScaleConfig(ffn_expansion=EXPANSION))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())  # checked before any module is touched
    assert list(model.state_dict()) == before


def test_a_gguf_model_dequantised_on_load_is_a_plain_model():
    """transformers records GGUF as the model's quantization even when it dequantised every weight to float."""
    model = tiny_llama(num_hidden_layers=2)
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": True}
    ids = random_ids()
    expected = logits(model, ids)
    assert torch.equal(logits(get_peft_model(model, ScaleConfig(ffn_expansion=EXPANSION)), ids), expected)


# ---------------------------------------------------------------------------------------------- 6. benchmark


def test_the_quantized_benchmark_quick_run(tmp_path):
    """benchmarks/quantized.py --quick: SCALE-FFN and LoRA of (about) the same trainable size on the nf4 base, their
    ratios, and the transfer onto the fp32 base."""
    from benchmarks import quantized

    result = quantized.main(["--quick", "--output-dir", str(tmp_path)])
    training = result["training"]
    assert set(training) == {"lora", "scale_ffn"}
    sizes = [row["trainable_params"] for row in training.values()]
    assert abs(sizes[0] - sizes[1]) <= 0.2 * sizes[1]
    assert result["ratios"]["scale_ffn/lora time"] == training["scale_ffn"]["median_s"] / training["lora"]["median_s"]
    transfer = result["transfer"]
    assert transfer["steps"] == 2 and all(v > 0 for v in transfer["loss"].values())
    assert transfer["bases_fp32_vs_nf4"]["max"] > 0
    assert (tmp_path / "quantized_tiny_quick.json").is_file()
