"""merge_report: how far a merge moves the model, on a probe batch, against what the dtype
explains; and the same weight figures from `lightning-lora merge`."""

import copy
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_lora import LoRAStateError, inject_lora, lora_parameters, merge_lora, save_adapter
from lightning_lora.cli import main
from lightning_lora.report import MergeReport, dtype_tolerance, merge_report

from .hf_models import as_if_trained, bert, ids, llama


def lm_logits(model, tokens):
    return model(input_ids=tokens).logits


def adapted_llama(dtype=torch.float32):
    model = llama().to(dtype)
    inject_lora(model, r=4)
    as_if_trained(model)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_float32_merge_is_exact_up_to_rounding_and_the_model_comes_back_unmerged():
    model = adapted_llama()
    before = snapshot(model)
    report = merge_report(model, ids(), forward=lm_logits)
    assert report.within_dtype and report.dtype == "float32" and report.weights == 14
    assert report.weight_max_ulps == 0.0  # the fp32 merge is the merged weight
    assert 0 < report.output_max_rel_diff <= dtype_tolerance(torch.float32) == 2**-14
    assert unchanged(model, before) and not any(
        t.merged_adapters for t in model.modules() if hasattr(t, "merged_adapters")
    )


def test_a_bfloat16_merge_rounds_each_weight_once_and_its_drift_is_explained():
    report = merge_report(adapted_llama(torch.bfloat16), ids(), forward=lm_logits)
    assert report.dtype == "bfloat16" and 0 < report.weight_max_ulps <= 0.5
    assert report.within_dtype and report.output_max_rel_diff <= report.output_tolerance == 4 * 2**-7


def test_keep_merged_leaves_the_model_exactly_as_merge_lora_does():
    reported, merged = adapted_llama(torch.bfloat16), adapted_llama(torch.bfloat16)
    merge_report(reported, ids(), forward=lm_logits, keep_merged=True)
    merge_lora(merged)
    assert unchanged(reported, snapshot(merged))
    with pytest.raises(LoRAStateError, match="already merged"):
        merge_lora(reported)


class ScaledLinear(nn.Linear):
    """A Linear subclass that does not compute x Wᵀ with its weight (an equalized learning-rate
    layer): merging ΔW into W is then not the adapted model."""

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


def test_a_merge_that_changes_what_the_model_computes_is_reported_beyond_the_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    inject_lora(model, r=2)
    as_if_trained(model)
    before = snapshot(model)
    report = merge_report(model, torch.randn(8, 16))
    assert not report.within_dtype and report.weight_max_ulps == 0.0
    assert report.output_max_rel_diff > 100 * report.output_tolerance
    assert "differs from the unmerged one by more than its dtype explains" in report.text()
    assert report.as_metrics()["lora/merge_within_dtype"] == 0.0
    assert unchanged(model, before)


class LossOnly(nn.Module):
    """Like a LightningModule's training_step: the model runs inside, a scalar comes out."""

    def __init__(self):
        super().__init__()
        self.lm = llama()

    def forward(self, tokens):
        return self.lm(input_ids=tokens, labels=tokens).loss


def test_watch_compares_what_a_submodule_returns_inside_the_call():
    model = LossOnly()
    inject_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    as_if_trained(model)
    with torch.no_grad():
        unmerged = model.lm(input_ids=ids()).logits
        merged = copy.deepcopy(model)
        merge_lora(merged)
        expected = (merged.lm(input_ids=ids()).logits - unmerged).abs().max().item()
    watched = merge_report(model, ids(), watch=model.lm)
    assert watched.output_max_abs_diff == pytest.approx(expected, abs=1e-7)  # the logits, not the loss


def test_the_probe_runs_in_eval_mode_without_grad_and_restores_every_mode():
    model = bert()  # dropout 0.1: in train mode two probes would differ by far more than rounding
    inject_lora(model, r=4)
    as_if_trained(model)
    model.train()
    model.encoder.layer[0].eval()
    report = merge_report(model, ids(), forward=lambda m, x: m(x).last_hidden_state)
    assert report.within_dtype
    assert model.training and not model.encoder.layer[0].training and model.encoder.layer[1].training
    assert all(p.grad is None for p in lora_parameters(model))


def test_a_refused_merge_raises_and_changes_nothing():
    model = adapted_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"][0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(LoRAStateError, match="gives NaN or Inf"):
        merge_report(model, ids(), forward=lm_logits)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


def test_the_metrics_are_lora_merge_figures():
    report = MergeReport("bfloat16", 3, 1e-3, 0.5, "a", 0.01, 0.002, 0.03125)
    assert report.as_metrics() == {
        "lora/merge_weight_max_abs_error": 1e-3,
        "lora/merge_weight_max_ulps": 0.5,
        "lora/merge_within_dtype": 1.0,
        "lora/merge_output_max_abs_diff": 0.01,
        "lora/merge_output_max_rel_diff": 0.002,
        "lora/merge_output_tolerance": 0.03125,
    }


def test_the_command_line_merge_prints_the_weight_report(tmp_path, capsys):
    model = adapted_llama(torch.bfloat16)
    save_adapter(model, tmp_path / "adapter")
    save_file(
        {k: v.contiguous() for k, v in llama().to(torch.bfloat16).state_dict().items() if k != "lm_head.weight"},
        tmp_path / "base.safetensors",
    )
    assert (
        main(
            [
                "merge",
                "--base",
                str(tmp_path / "base.safetensors"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--output",
                str(tmp_path / "out.safetensors"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "merge report (14 weight(s), bfloat16): merged weights within 0.5 ulp of an exact fp32 merge" in printed


@pytest.mark.parametrize("build", ["gpt2", "resnet"])
def test_transposed_and_conv_weights_are_reported_and_given_back_bit_for_bit(build):
    from . import tiny_models

    case = getattr(tiny_models, build)()
    model = case.model
    inject_lora(model, r=2, target_modules=case.targets)  # GPT-2's Conv1D (stored transposed), ResNet's convs
    as_if_trained(model)
    before = snapshot(model)
    report = merge_report(model, None, forward=lambda m, _: case.run(m))
    assert report.within_dtype and report.weight_max_ulps == 0.0
    assert unchanged(model, before)


def test_the_command_line_report_reads_conv1d_weights_in_their_stored_layout(tmp_path, capsys):
    from . import tiny_models

    case = tiny_models.gpt2()
    model = case.model
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors"
    )
    inject_lora(model, r=2, target_modules=case.targets)
    as_if_trained(model)
    save_adapter(model, tmp_path / "adapter")
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--output", str(tmp_path / "out.safetensors")]) == 0
    assert re.search(
        r"merge report \(8 weight\(s\), bfloat16\): merged weights within 0\.5 ulp", capsys.readouterr().out
    )
