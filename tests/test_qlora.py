"""QLoRA: LoRA over bitsandbytes 4-bit and 8-bit layers, on this CPU (bitsandbytes 0.50 runs
``Linear4bit`` / ``Linear8bitLt`` here; Lightning's ``BitsandbytesPrecision`` plugin itself is
CUDA-only, so its conversion is reproduced by hand and the plugin runs in the GPU benchmark)."""

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRACallback,
    LoRAStateError,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    parameter_stats,
    read_adapter,
    save_adapter,
    unload_lora,
)
from lightning_lora.fused import fast_path
from lightning_lora.layers import LoRALinear
from lightning_lora.quantized import dequantized

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")

D_IN, D_OUT = 64, 48


def quantize(linear: nn.Linear, kind: str = "nf4", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """What Lightning's plugin and transformers do: the same weights in a bitsandbytes layer,
    quantized when it moves to its device."""
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
        )
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype, quant_type=kind
        )
    q.load_state_dict(linear.state_dict())
    return q.to("cpu").requires_grad_(False)


class Net(nn.Module):
    def __init__(self, kind: str | None = "nf4") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(D_IN, D_OUT)
        self.down = nn.Linear(D_OUT, 8)
        if kind is not None:
            self.up = quantize(self.up, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)).to(self.down.weight.dtype))


def trained(model: nn.Module, **config) -> nn.Module:
    inject_lora(model, target_modules=["up"], init="gaussian", **config)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_adapters_follow_the_compute_dtype_of_a_quantized_base(kind):
    model = trained(Net(kind))
    expected = torch.float16 if kind == "int8" else torch.bfloat16
    assert {p.dtype for p in lora_parameters(model)} == {expected}
    assert isinstance(model.up, LoRALinear) and type(model.up.base_layer).__module__.startswith("bitsandbytes")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fast_path_equals_the_formula_over_the_dequantized_weight_forward_and_backward(kind):
    model = trained(Net(kind))
    layer = model.up
    dtype = layer.lora_A["default"].dtype
    x = torch.randn(2, 150, D_IN, dtype=dtype, requires_grad=True)  # 300 rows: past bitsandbytes' own kernel
    W = dequantized(layer.base_layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    results = {}
    for mode in ("always", "never"):
        with fast_path(mode):
            y = layer(x)
            y.float().square().sum().backward()
        assert (type(y.grad_fn).__name__ == "LoRALinearFunctionBackward") == (mode == "always")
        results[mode] = (y.detach().float(), x.grad.clone(), A.grad.clone(), B.grad.clone())
        x.grad = A.grad = B.grad = None
    formula = (
        x.detach().float() @ W.T
        + layer.base_layer.bias.float()
        + 2.0 * (x.detach().float() @ A.float().T) @ B.float().T
    )
    assert relative_error(results["always"][0], formula) < 1e-2
    for fast, reference in zip(results["always"], results["never"], strict=True):  # y, dx, dA, dB
        assert relative_error(fast, reference) < 1e-2  # bf16: sums over 300 rows round differently


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_few_rows_keep_the_bitsandbytes_kernel_of_the_base():
    layer = trained(Net()).up
    y = layer(torch.randn(4, D_IN, dtype=torch.bfloat16, requires_grad=True))  # e.g. generation
    assert type(y.grad_fn).__name__ != "LoRALinearFunctionBackward"


def test_merge_lora_refuses_a_packed_weight_and_changes_nothing():
    model = trained(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAStateError, match=r"'up'.*quantized.*unload_lora\(model, merge=True\)"):
        merge_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unload_with_merge_gives_a_dense_layer_in_the_compute_dtype_equal_to_the_adapted_model():
    model = trained(Net())
    x = torch.randn(16, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x).float()
    unload_lora(model, merge=True)
    assert type(model.up) is nn.Linear and model.up.weight.dtype == torch.bfloat16
    assert not model.up.weight.requires_grad
    with torch.no_grad():
        got = model(x).float()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)  # one bf16 rounding of W + ΔW


def test_requantize_on_request_reports_the_added_error():
    model = trained(Net())
    x = torch.randn(16, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x).float()
    with pytest.warns(UserWarning, match=r"requantized 1 merged layer.*'up'"):
        unload_lora(model, merge=True, requantize=True)
    assert isinstance(model.up, bnb.nn.Linear4bit) and model.up.weight.dtype == torch.uint8
    with torch.no_grad():
        got = model(x).float()
    assert (got - expected).abs().max() < 0.25 * expected.abs().max()


def test_a_poisoned_adapter_leaves_the_quantized_model_untouched():
    model = trained(Net())
    with torch.no_grad():
        model.up.lora_B["default"][0, 0] = float("inf")
    packed = model.up.base_layer.weight.clone()
    with pytest.raises(LoRAStateError, match="NaN or Inf"):
        unload_lora(model, merge=True)
    assert isinstance(model.up, LoRALinear) and torch.equal(model.up.base_layer.weight, packed)


def test_adapter_saved_on_4bit_loads_on_a_bf16_base_and_on_a_4bit_base(tmp_path):
    model = trained(Net())
    save_adapter(model, tmp_path / "a")
    x = torch.randn(8, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x).float()
    dense = Net(kind=None).to(torch.bfloat16)
    load_adapter(dense, tmp_path / "a")
    quantized = Net()
    load_adapter(quantized, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(quantized(x).float(), expected)  # same 4-bit base: same numbers
        torch.testing.assert_close(dense(x).float(), expected, atol=0.1, rtol=0.1)  # base differs by nf4 error


def test_parameter_counts_see_through_4bit_packing():
    stats = parameter_stats(trained(Net()))
    assert stats.total == (D_IN * D_OUT + D_OUT) + (D_OUT * 8 + 8) + 8 * (D_IN + D_OUT)


class Classifier(L.LightningModule):
    def __init__(self, quantize_after_setup: bool) -> None:
        super().__init__()
        self.net = Net(kind=None if quantize_after_setup else "nf4").to(torch.bfloat16)
        self.quantize_after_setup = quantize_after_setup

    def on_fit_start(self) -> None:
        if self.quantize_after_setup:  # what BitsandbytesPrecision.convert_module does after setup
            self.net.up.base_layer = quantize(self.net.up.base_layer.float())

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x.to(torch.bfloat16)).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("quantize_after_setup", [False, True], ids=["quantized-by-hand", "plugin-style"])
def test_callback_trains_a_4bit_model_and_merges_it_to_a_dense_model_at_fit_end(tmp_path, quantize_after_setup):
    data = torch.utils.data.TensorDataset(torch.randn(32, D_IN), torch.randint(0, 8, (32,)))
    module = Classifier(quantize_after_setup)
    callback = LoRACallback(r=4, target_modules=["net.up"], adapter_dir=str(tmp_path / "adapter"))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    adapter = read_adapter(tmp_path / "adapter")
    (A, B) = adapter.pairs["net.up"]
    assert A.dtype == torch.bfloat16 and B.abs().sum() > 0  # trained: B left zero
    assert type(module.net.up) is nn.Linear and module.net.up.weight.dtype == torch.bfloat16
