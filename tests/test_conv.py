"""LoRA on nn.Conv1d/2d/3d: the update is a dense ΔW in the kernel (every padding mode, dilation,
stride), merge and unload give back the plain conv, PEFT reads ours and we read PEFT's (a ResNet
and a diffusers UNet), and what cannot be adapted exactly is refused before anything changes."""

import copy
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRATargetError,
    adapted_weights,
    combine_adapters,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    read_adapter,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.analysis import delta_stats
from lightning_lora.cli import inspect_adapter
from lightning_lora.export import merge_into_state_dict
from lightning_lora.layer_types import LoRAConv
from lightning_lora.state import has_lora

from .tiny_models import randomize, resnet, types_and_keys, unet

CONVS = {
    "1d dilated reflect": (lambda: nn.Conv1d(3, 6, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 3, 11)),
    "1d same circular even kernel": (lambda: nn.Conv1d(3, 6, 4, padding="same", padding_mode="circular"), (2, 3, 10)),
    "2d strided": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "2d valid rectangular dilated": (lambda: nn.Conv2d(3, 6, (3, 2), padding="valid", dilation=(1, 2)), (2, 3, 9, 9)),
    "2d same replicate dilated": (
        lambda: nn.Conv2d(3, 6, 3, padding="same", dilation=2, padding_mode="replicate"),
        (2, 3, 9, 9),
    ),
    "2d 1x1 without bias": (lambda: nn.Conv2d(3, 6, 1, bias=False), (2, 3, 5, 5)),
    "3d strided reflect": (
        lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="reflect"),
        (1, 2, 5, 6, 6),
    ),
}


def adapted(make_conv, **fields):
    """``nn.Sequential(conv)`` with a random (non-zero) adapter on the conv, and a copy of the base."""
    torch.manual_seed(0)
    model = nn.Sequential(make_conv())
    base = copy.deepcopy(model)
    inject_lora(model, r=2, alpha=4, target_modules=["0"], **fields)
    randomize(model, std=0.3)
    return model, base


def dense_reference(base, layer):
    """The base conv with ``W + scale · (B A)`` reshaped to its kernel: what the update must equal."""
    A, B, scale = layer.update("default")
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference[0].weight += (scale * B @ A).reshape(reference[0].weight.shape)
    return reference


@pytest.mark.parametrize("case", CONVS)
def test_update_equals_a_dense_delta_in_the_kernel(case):
    make_conv, shape = CONVS[case]
    model, base = adapted(make_conv)
    layer = model[0]
    conv = base[0]
    assert isinstance(layer, LoRAConv)
    # PEFT's layout: A a kernel over all input channels, B a 1×1 conv
    assert tuple(layer.lora_A["default"].shape) == (2, conv.in_channels, *conv.kernel_size)
    assert tuple(layer.lora_B["default"].shape) == (conv.out_channels, 2) + (1,) * len(conv.kernel_size)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_reference(base, layer)(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CONVS)
def test_merge_equals_unmerged_forward_and_unload_gives_back_the_plain_conv(case):
    make_conv, shape = CONVS[case]
    model, base = adapted(make_conv)
    x = torch.randn(shape)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model[0].weight, base[0].weight, rtol=0, atol=1e-6)
        unload_lora(model, merge=True)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    assert type(model[0]) is type(base[0])
    assert types_and_keys(model) == types_and_keys(base)


def test_only_A_and_B_get_gradients():
    model, _ = adapted(CONVS["2d strided"][0], dropout=0.1)
    model.train()
    model(torch.randn(2, 3, 9, 9)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert model[0].base_layer.weight.grad is None and not model[0].base_layer.weight.requires_grad


def test_a_channels_last_kernel_is_merged_in_place():
    model, base = adapted(lambda: nn.Conv2d(3, 6, 3, padding=1).to(memory_format=torch.channels_last))
    weight = model[0].base_layer.weight
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        assert model[0].base_layer.weight is weight and not torch.equal(weight, base[0].weight)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)


def test_conv_attributes_read_through_the_wrapper():
    model, _ = adapted(CONVS["2d strided"][0])
    assert (model[0].in_channels, model[0].stride, model[0].padding) == (3, (2, 2), (1, 1))


def test_combined_conv_adapters_add_their_updates():
    model, _ = adapted(CONVS["2d strided"][0])
    inject_lora(model, r=3, target_modules=["0"], adapter_name="b", init="gaussian")
    layer = model[0]
    dense = {n: (lambda A, B, s: s * B @ A)(*layer.update(n)) for n in ("default", "b")}
    combine_adapters(model, {"default": 0.7, "b": -0.2}, "mix")
    A, B, scale = layer.update("mix")
    assert tuple(layer.lora_A["mix"].shape) == (5, 3, 3, 3)
    torch.testing.assert_close(scale * B @ A, 0.7 * dense["default"] - 0.2 * dense["b"], rtol=0, atol=1e-6)


def test_analysis_sees_a_conv_update_as_its_matrix():
    model, _ = adapted(CONVS["3d strided reflect"][0])
    A, B, scale = model[0].update("default")
    (stats,) = delta_stats(model)
    assert stats.name == "0" and stats.r == 2
    torch.testing.assert_close(torch.tensor(stats.singular_values), torch.linalg.svdvals(scale * B @ A)[:2])


# ------------------------------------------------------------------------------- refusals


class StdConv2d(nn.Conv2d):
    """A weight-standardised conv (as in timm): its forward transforms W, so W + ΔW ≠ update."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (
            nn.Conv2d(4, 4, 3, groups=2),
            r"selects 'block\.conv' \(Conv2d\), which LoRA cannot adapt exactly: groups=2: .* Leave it out: "
            r"exclude_modules=\['block\.conv'\]",
        ),
        (StdConv2d(4, 4, 3), r"StdConv2d subclasses Conv2d with a forward of its own"),
        (
            nn.ConvTranspose2d(4, 4, 3),
            r"'block\.conv' of type ConvTranspose2d, which LoRA cannot adapt \(supported: .*nn\.Conv1d/2d/3d",
        ),
    ],
)
def test_a_conv_lora_cannot_adapt_exactly_is_refused_and_nothing_changes(conv, message):
    model = nn.Sequential()
    model.add_module("block", nn.Module())
    model.block.conv, model.block.other = conv, nn.Conv2d(4, 4, 1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRATargetError, match=message):
        inject_lora(model, target_modules=["conv", "other"])
    assert not has_lora(model) and type(model.block.conv) is type(conv)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_refused_conv_can_be_excluded():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    assert inject_lora(model, target_modules=["0", "1"], exclude_modules=["0"]) == ["1"]


def test_all_linear_leaves_convs_to_be_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    said = r"leaves out 1 weight layer\(s\) of Sequential, e\.g\. '0': Conv2d \(1\), which it does not count as linear"
    with pytest.warns(UserWarning, match=said + r" \(PEFT's meaning\): name them in target_modules to adapt them"):
        assert inject_lora(model, target_modules="all-linear") == ["2"]
    only_convs = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(LoRATargetError, match=r"nothing is left to adapt\. .*" + said):
        inject_lora(only_convs, target_modules="all-linear")


def test_an_adapter_whose_kernel_does_not_fit_is_refused_before_anything_changes(tmp_path):
    model, _ = adapted(lambda: nn.Conv2d(3, 6, 3, padding=1))
    save_adapter(model, tmp_path / "a")
    other = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2))  # same name and channels, another kernel
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match=r"the file has lora_A \(2, 3, 3, 3\) .* needs \(2, 3, 5, 5\)"):
        load_adapter(other, tmp_path / "a")
    assert not has_lora(other) and type(other[0]) is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# ------------------------------------------------------------------------------ PEFT interop

MODELS = {"resnet": resnet, "unet": unet}


@pytest.mark.parametrize("name", MODELS)
def test_peft_loads_our_conv_adapters_with_our_outputs(name, tmp_path):
    case = MODELS[name]()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, alpha=8, target_modules=case.targets)
    randomize(ours)
    save_adapter(ours, tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    with torch.no_grad():
        expected = case.run(ours)
        torch.testing.assert_close(case.run(peft), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(case.run(peft.merge_and_unload()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_we_load_peft_conv_adapters_with_peft_outputs(name, tmp_path):
    case = MODELS[name]()
    peft = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    randomize(peft)
    peft.eval().save_pretrained(tmp_path)
    ours = copy.deepcopy(case.model)
    names = load_adapter(ours, tmp_path)
    assert names and all(isinstance(t.layer, LoRAConv) for t in adapted_weights(ours))
    with torch.no_grad():
        expected = case.run(peft)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
        unload_lora(ours, merge=True)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
    assert types_and_keys(ours) == types_and_keys(case.model)


def test_peft_fails_on_a_dilated_conv_where_ours_matches_the_dense_reference(tmp_path):
    """PEFT 0.21 builds its conv A without the base's dilation: the update's length differs."""
    make_conv, shape = CONVS["1d dilated reflect"]
    torch.manual_seed(0)
    base = nn.Sequential(make_conv())
    base[0].padding_mode = "zeros"
    x = torch.randn(shape)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(RuntimeError, match="must match the size"), torch.no_grad():
        peft(x)
    ours = copy.deepcopy(base)
    inject_lora(ours, r=2, target_modules=["0"])
    randomize(ours, std=0.3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), dense_reference(base, ours[0])(x), rtol=0, atol=1e-5)


def test_peft_ignores_padding_mode_in_its_update_where_ours_follows_it(tmp_path):
    """PEFT 0.21 zero-pads its conv A whatever the base's ``padding_mode``, so its unmerged
    model differs from its own merge; ours equals that merge, i.e. the dense reference."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"))
    ours = copy.deepcopy(base)
    inject_lora(ours, r=2, target_modules=["0"])
    randomize(ours, std=0.3)
    save_adapter(ours, tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        peft_unmerged = peft(x)
        peft_merged = peft.merge_and_unload()(x)
        assert (peft_unmerged - peft_merged).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), peft_merged, rtol=0, atol=1e-5)


def test_merging_a_conv_file_into_a_checkpoint_equals_merging_the_model(tmp_path):
    case = resnet()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, target_modules=case.targets)
    randomize(ours)
    save_adapter(ours, tmp_path)
    assert re.search(r"encoder\.stages\.0\.layers\.0\.layer\.0\.convolution +8×8×3×3 +4 ", inspect_adapter(tmp_path))
    merged = merge_into_state_dict(case.model.state_dict(), read_adapter(tmp_path))
    unload_lora(ours, merge=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
