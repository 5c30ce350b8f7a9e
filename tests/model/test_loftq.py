"""LoftQ init on a 4-bit base: at step 0 every LoRA-wrapped 4-bit layer (base + adapter) is closer to the float
layer than with the default init (B = 0: the quantized layer alone), on the packed 4-bit base and on the dense copy
``cache_dequantized`` makes; the whole model's logits too. PEFT's scale-blind twin (B @ A = the residual, whatever
alpha / r) is caught; a model without safetensors is refused in one line."""

from __future__ import annotations

import pytest
import torch

from qlorakit.errors import UserError
from qlorakit.model.load import cache_dequantized, load_base_model
from qlorakit.model.loftq import PEFT_PREFIX, FloatWeights, loftq_factors, quantized_weight
from qlorakit.model.lora import add_lora, target_modules

R, ALPHA = 8, 16.0  # scale 2, as qlorakit's default alpha / r


def _lora_4bit(path, init: str, dense: bool = False, rslora: bool = False):
    base = load_base_model(str(path), bits=4, bf16=False, device=torch.device("cpu"))
    if dense:
        assert cache_dequantized(base, torch.float32) > 0
    model = add_lora(base, r=R, alpha=ALPHA, dropout=0.0, modules=target_modules(base, "all"), seed=0, init=init,
                     base_path=str(path), rslora=rslora)
    return model.eval()


def _layers(model):
    return [(n.removeprefix(PEFT_PREFIX), m) for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


@torch.no_grad()
def _layer_errors(model, path) -> dict[str, float]:
    """Per LoRA layer: || layer(x) - x @ W_float.T || on fixed random inputs."""
    floats = FloatWeights(str(path))
    errors = {}
    for name, layer in _layers(model):
        w = floats.get(name + ".weight").float()
        x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
        errors[name] = float((layer(x) - x @ w.T).norm())
    return errors


@pytest.mark.parametrize("dense", [False, True], ids=["packed-4bit", "cache_dequantized"])
def test_loftq_lowers_every_4bit_layers_error_at_step_0(tiny_llama, dense):
    default = _layer_errors(_lora_4bit(tiny_llama, "default", dense), tiny_llama)
    loftq_model = _lora_4bit(tiny_llama, "loftq", dense)
    loftq = _layer_errors(loftq_model, tiny_llama)
    assert default.keys() == loftq.keys() and len(loftq) == 14  # 2 layers x 7 projections
    assert all(loftq[k] < 0.9 * default[k] for k in loftq), (default, loftq)
    if not dense:
        from peft.tuners.lora.bnb import Linear4bit

        assert all(isinstance(m, Linear4bit) for _, m in _layers(loftq_model))  # the 4-bit layers themselves


def test_loftq_honours_rslora_scale(tiny_llama):
    """The factors are divided by the layer's own scale: alpha / sqrt(r) with rsLoRA (2.83 here, not 2)."""
    default = _layer_errors(_lora_4bit(tiny_llama, "default", rslora=True), tiny_llama)
    loftq = _layer_errors(_lora_4bit(tiny_llama, "loftq", rslora=True), tiny_llama)
    assert all(loftq[k] < 0.9 * default[k] for k in loftq)


@torch.no_grad()
def test_whole_model_logits_move_toward_the_float_models(tiny_llama):
    ids = torch.arange(5, 60)[None]
    float_logits = load_base_model(str(tiny_llama), bits=16, bf16=False, device=torch.device("cpu"))(ids).logits
    gap = {init: float((_lora_4bit(tiny_llama, init)(input_ids=ids).logits - float_logits).norm())
           for init in ("default", "loftq")}
    assert gap["loftq"] < 0.9 * gap["default"], gap


@torch.no_grad()
def test_the_scale_blind_twin_is_caught(tiny_llama):
    """PEFT's replace_lora_weights_loftq sets B @ A to the rank-r residual and ignores the LoRA scale; at alpha / r =
    2 the adapter then adds twice it, and the layers end no closer to the float ones than B = 0 leaves them."""
    model = _lora_4bit(tiny_llama, "default")
    default = _layer_errors(model, tiny_llama)
    floats = FloatWeights(str(tiny_llama))
    for name, layer in _layers(model):
        a, b = loftq_factors(floats.get(name + ".weight"), quantized_weight(layer.get_base_layer()), R, 1.0)
        layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data = a, b
    twin = _layer_errors(model, tiny_llama)
    loftq = _layer_errors(_lora_4bit(tiny_llama, "loftq"), tiny_llama)
    assert sum(twin.values()) > 0.95 * sum(default.values()) > sum(loftq.values()) / 0.9


def test_a_model_without_safetensors_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="loftq reads the float weights from safetensors files"):
        FloatWeights(str(tmp_path))
