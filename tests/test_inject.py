"""Injecting LoRA into whole models, taking it out, and the errors that teach."""

import copy

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRALinear,
    LoRAStateError,
    LoRATargetError,
    adapter_names,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    parameter_stats,
    set_adapter,
    unload_lora,
    unmerge_lora,
)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.query, self.value, self.dense = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.dense(torch.tanh(self.query(x)) * self.value(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def transformer(batch_first=True, d=32, heads=4):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def randomize(model):
    """Give every B non-zero weights, as after training."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)


# ------------------------------------------------------------------------------ targets


def test_suffix_targets_adapt_exactly_those_modules(net):
    names = inject_lora(net, r=2, target_modules=["query", "value"])
    assert names == ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    assert isinstance(net.layers[0].query, LoRALinear) and isinstance(net.layers[0].dense, nn.Linear)


def test_regex_target_must_match_the_full_name(net):
    names = inject_lora(net, r=2, target_modules=r"layers\.1\.(query|dense)")
    assert names == ["layers.1.query", "layers.1.dense"]


def test_all_linear_with_exclude_and_trainable_head(net):
    names = inject_lora(net, r=2, target_modules="all-linear", exclude_modules=["dense"], trainable_modules=["head"])
    assert "head" not in names and not any(n.endswith("dense") for n in names)
    assert len(names) == 4
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)


def test_base_parameters_are_frozen_and_lora_ones_trainable(net):
    inject_lora(net, r=2, target_modules=["query"])
    lora = {id(p) for p in lora_parameters(net)}
    for name, p in net.named_parameters():
        assert p.requires_grad == (id(p) in lora), name


def test_target_that_matches_nothing_suggests_and_lists_modules(net):
    with pytest.raises(LoRATargetError) as err:
        inject_lora(net, target_modules=["qury", "value"])
    message = str(err.value)
    assert "'qury' matched no module" in message and "Did you mean 'query'?" in message
    assert "query (2)" in message and "value (2)" in message


def test_regex_that_matches_nothing_lists_modules(net):
    with pytest.raises(LoRATargetError, match=r"regex 'attn\.\*' matched no module.*query \(2\)"):
        inject_lora(net, target_modules="attn.*")


def test_unsupported_layer_type_names_its_type_and_the_supported_ones(net):
    with pytest.raises(LoRATargetError) as err:
        inject_lora(net, target_modules=["norm"])
    message = str(err.value)
    assert "LayerNorm" in message and "nn.Linear" in message and "nn.MultiheadAttention" in message


def test_container_target_points_to_its_linear_layers(net):
    with pytest.raises(LoRATargetError, match=r"'layers\.0' of type Block.*e\.g\. \['layers\.0\.query'"):
        inject_lora(net, target_modules=["layers.0"])


def test_exclude_typo_is_an_error_not_a_silent_no_op(net):
    with pytest.raises(LoRATargetError, match=r"exclude_modules entry 'haed' matched no module\. Did you mean 'head'"):
        inject_lora(net, exclude_modules=["haed"])


def test_injecting_twice_is_refused_with_the_fix(net):
    inject_lora(net, r=2, target_modules=["query"])
    with pytest.raises(LoRAStateError, match=r"already injected.*unload_lora\(model\).*adapter_name="):
        inject_lora(net, r=2, target_modules=["query"])


def test_second_named_adapter_joins_the_same_layers_and_becomes_active(net):
    inject_lora(net, r=2, target_modules=["query"])
    inject_lora(net, r=4, target_modules=["query"], adapter_name="b")
    layer = net.layers[0].query
    assert isinstance(layer.base_layer, nn.Linear)  # not wrapped twice
    assert layer.adapter_names == ["default", "b"] and layer.active_adapters == ["b"]
    assert adapter_names(net) == ["default", "b"]
    assert all(p.requires_grad for p in lora_parameters(net, "b"))
    assert not any(p.requires_grad for p in lora_parameters(net, "default"))


# ------------------------------------------------------------------------ merge / unload


def test_merge_equals_unmerged_forward_and_unmerge_restores_w(net):
    reference = copy.deepcopy(net)
    inject_lora(net, r=4, target_modules="all-linear")
    randomize(net)
    x = torch.randn(5, 16)
    unmerged = net(x)
    merge_lora(net)
    torch.testing.assert_close(net(x), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(net)
    torch.testing.assert_close(net.layers[0].query.weight, reference.layers[0].query.weight, rtol=0, atol=1e-6)


def test_merging_twice_is_refused(net):
    inject_lora(net, r=2, target_modules=["query"])
    merge_lora(net)
    with pytest.raises(LoRAStateError, match=r"already merged.*unmerge_lora\(model\) first"):
        merge_lora(net)


def test_unmerge_without_merge_and_merge_without_lora_are_refused(net):
    with pytest.raises(LoRAStateError, match="no LoRA layers; call inject_lora first"):
        merge_lora(net)
    inject_lora(net, r=2, target_modules=["query"])
    with pytest.raises(LoRAStateError, match="nothing to unmerge"):
        unmerge_lora(net)


def test_safe_merge_refuses_nan_and_leaves_every_weight_untouched(net):
    inject_lora(net, r=2, target_modules=["query", "value"])
    randomize(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.layers[1].value.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(LoRAStateError, match=r"into 'layers\.1\.value' gives NaN or Inf.*no weight was changed"):
        merge_lora(net)
    for key, value in net.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, before[key]), key


def test_unload_gives_back_original_types_keys_and_flags(net):
    reference = copy.deepcopy(net)
    net.head.requires_grad_(False)  # a user's own choice survives inject + unload
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    inject_lora(net, r=4, target_modules="all-linear")
    randomize(net)
    x = torch.randn(5, 16)
    unmerged = net(x)
    unload_lora(net, merge=True)
    assert [type(m) for m in net.modules()] == [type(m) for m in reference.modules()]
    assert list(net.state_dict()) == list(reference.state_dict())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    torch.testing.assert_close(net(x), unmerged, rtol=0, atol=1e-5)
    fresh = Net()
    fresh.load_state_dict(net.state_dict(), strict=True)


def test_unload_without_merge_restores_the_base_model(net):
    reference = copy.deepcopy(net)
    inject_lora(net, r=4, target_modules="all-linear")
    randomize(net)
    merge_lora(net)
    unload_lora(net, merge=False)
    x = torch.randn(5, 16)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------- MultiheadAttention


def test_mha_gets_its_own_a_b_for_q_k_v_and_out_proj():
    model = transformer()
    names = inject_lora(model, r=4, target_modules=["self_attn"])
    assert names[:4] == [
        "layers.0.self_attn.in_proj_weight[q]",
        "layers.0.self_attn.in_proj_weight[k]",
        "layers.0.self_attn.in_proj_weight[v]",
        "layers.0.self_attn.out_proj",
    ]
    stats = parameter_stats(model)
    assert sum(m.params for m in stats.modules) == 2 * 4 * (4 * (32 + 32))  # 2 layers × 4 weights × r(d_in+d_out)


def test_mha_projections_and_out_proj_exclusion():
    model = transformer()
    names = inject_lora(
        model, r=2, target_modules=["self_attn"], mha_projections=["q", "v"], exclude_modules=["out_proj"]
    )
    assert [n.rsplit(".", 1)[-1] for n in names] == ["in_proj_weight[q]", "in_proj_weight[v]"] * 2


def test_mha_with_separate_kdim_vdim_adapts_its_separate_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    names = inject_lora(holder, r=2, target_modules=["attn"], init="gaussian")
    assert names == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"]
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    before = mha(q, k, v)[0]
    merge_lora(holder)
    torch.testing.assert_close(mha(q, k, v)[0], before, rtol=0, atol=1e-5)


def test_transformer_fast_path_sees_the_adapters():
    """nn.TransformerEncoderLayer's eval/no_grad fast path reads weights directly: an adapter
    that lived only in a wrapped forward would be skipped there (FINDINGS.md)."""
    model = transformer()
    inject_lora(model, r=4, target_modules="all-linear", init="gaussian")
    x = torch.randn(2, 5, 32)
    model.train()  # dropout=0: the slow path, same function
    slow = model(x)
    model.eval()
    with torch.no_grad():
        fast = model(x)
        base = transformer().eval()(x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert (fast - base).abs().max() > 1e-3  # the adapters do change the output


def test_dropout_on_mha_adapters_is_refused():
    with pytest.raises(LoRATargetError, match=r"dropout=0\.1 cannot apply.*Set dropout=0\.0"):
        inject_lora(transformer(), target_modules=["self_attn"], dropout=0.1)


def test_transformer_unload_restores_keys_in_order():
    model = transformer()
    keys = list(model.state_dict())
    inject_lora(model, r=2, target_modules="all-linear", init="gaussian")
    assert keys != list(model.state_dict())
    unload_lora(model)
    assert keys == list(model.state_dict())
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention


# ------------------------------------------------------------------------ state + stats


def test_lora_state_dict_holds_adapters_and_trainable_modules_under_model_keys(net):
    inject_lora(net, r=2, target_modules=["query"], trainable_modules=["head"])
    state = lora_state_dict(net)
    assert set(state) == {
        "layers.0.query.lora_A.default",
        "layers.0.query.lora_B.default",
        "layers.1.query.lora_A.default",
        "layers.1.query.lora_B.default",
        "head.weight",
        "head.bias",
    }
    assert set(state) <= set(net.state_dict())


def test_parameter_stats_counts_trainable_total_and_ratio(net):
    total_before = sum(p.numel() for p in net.parameters())
    inject_lora(net, r=2, target_modules=["query"])
    stats = parameter_stats(net)
    lora = 2 * 2 * (16 + 16)
    assert (stats.trainable, stats.total) == (lora, total_before + lora)
    assert stats.ratio == pytest.approx(lora / (total_before + lora))
    assert [m.name for m in stats.modules] == ["layers.0.query", "layers.1.query"]
    assert "layers.*.query  ×2" in stats.table()
    assert stats.as_metrics()["lora/trainable_ratio"] == stats.ratio


def test_set_adapter_switches_without_reloading(net):
    inject_lora(net, r=2, target_modules=["query"], init="gaussian")
    inject_lora(net, LoRAConfig(r=2, target_modules=["query"], init="gaussian"), adapter_name="b")
    x = torch.randn(3, 16)
    out_b = net(x)
    set_adapter(net, "default")
    out_default = net(x)
    assert not torch.allclose(out_b, out_default)
    set_adapter(net, "b")
    assert torch.equal(net(x), out_b)
    with pytest.raises(LoRAStateError, match="no adapter named"):
        set_adapter(net, "c")
