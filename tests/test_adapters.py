"""Many adapters on one base: load side by side, switch, combine exactly, delete, disable."""

import copy

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfigError,
    LoRALinear,
    LoRAStateError,
    active_adapters,
    adapter_names,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    load_adapter,
    lora_config,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
    set_adapter,
    unmerge_lora,
)
from lightning_lora.io import read_adapter


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.query, self.value, self.dense = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.dense(torch.tanh(self.query(x)) * self.value(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# Two adapters that differ in every way the construction must handle: targets, rank, scale
# (plain alpha/r and rsLoRA) and dtype (float32 and bfloat16 on a float32 base).
A_CONFIG = {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}
B_CONFIG = {"r": 4, "alpha": 6, "target_modules": ["query"], "use_rslora": True, "adapter_dtype": "bfloat16"}
X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


def randomize(model, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, adapter_name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Adapters 'a' and 'b', each trained (randomised) on its own copy of the base and saved."""
    root = tmp_path_factory.mktemp("adapters")
    for name, config, seed in (("a", A_CONFIG, 1), ("b", B_CONFIG, 2)):
        model = Net()
        inject_lora(model, adapter_name=name, **config)
        randomize(model, name, seed)
        save_adapter(model, root / name, adapter_name=name)
    return root


def alone(files, name):
    """A fresh base with only adapter ``name``: the reference switching must reproduce."""
    model = Net()
    load_adapter(model, files / name, adapter_name=name)
    return model


@pytest.fixture
def both(files):
    model = Net()
    load_adapter(model, files / "a", adapter_name="a")
    load_adapter(model, files / "b", adapter_name="b")
    return model


def run(model):
    with torch.no_grad():
        return model(X)


# -------------------------------------------------------------------------------- switching


def test_the_adapter_loaded_last_is_the_only_active_and_trainable_one(both):
    assert adapter_names(both) == ["a", "b"]
    assert active_adapters(both) == ["b"]
    assert all(p.requires_grad for p in lora_parameters(both, "b"))
    assert not any(p.requires_grad for p in lora_parameters(both, "a"))


def test_switching_gives_exactly_each_adapter_loaded_alone(both, files):
    for name in ("a", "b", "a"):
        set_adapter(both, name)
        assert torch.equal(run(both), run(alone(files, name)))
    assert not torch.equal(run(alone(files, "a")), run(alone(files, "b")))


def test_several_active_adapters_add_their_updates(both):
    set_adapter(both, ["a", "b"])
    side_by_side = run(both)
    combine_adapters(both, {"a": 1.0, "b": 1.0}, "sum")  # float32 throughout
    # side by side, 'b' runs on bfloat16 activations: equal up to bf16 rounding (2⁻⁸ relative)
    torch.testing.assert_close(run(both), side_by_side, rtol=0, atol=2e-3)
    assert not torch.allclose(side_by_side, run(Net()), atol=1e-2)


def test_multihead_attention_adapters_with_different_projections_switch_exactly(tmp_path):
    def transformer():
        torch.manual_seed(0)
        return nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True).eval()

    model = transformer()
    inject_lora(model, r=2, target_modules=["self_attn"], mha_projections=["q"], adapter_name="a", init="gaussian")
    inject_lora(model, r=3, target_modules=["self_attn"], mha_projections=["k", "v"], adapter_name="b", init="gaussian")
    save_adapter(model, tmp_path / "a", adapter_name="a")
    save_adapter(model, tmp_path / "b", adapter_name="b")
    src, tgt = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    for name in ("a", "b"):
        set_adapter(model, name)
        fresh = transformer()
        load_adapter(fresh, tmp_path / name, adapter_name=name)  # its layers sit elsewhere in the chain
        with torch.no_grad():
            assert torch.equal(fresh(src, tgt), model(src, tgt))


# -------------------------------------------------------------------------------- combining


def by_hand(model, weights):
    """W + Σ wᵢ sᵢ Bᵢ Aᵢ for every Linear, in float32, from the adapters' own tensors."""
    merged = {}
    for t in lora_layers(model):
        w = t.weight.detach().clone()
        for name, weight in weights.items():
            if name in t.layer.lora_A:
                A, B = t.layer.lora_A[name].float(), t.layer.lora_B[name].float()
                w += weight * t.layer.scaling[name] * (B @ A)
        merged[t.name] = w
    return merged


def test_combining_is_exactly_the_weighted_sum_of_the_updates(both):
    weights = {"a": 0.7, "b": -0.3}
    expected = by_hand(both, weights)
    combine_adapters(both, weights, "mix")
    assert active_adapters(both) == ["mix"]
    query, value = both.layers[0].query, both.layers[0].value
    assert (query.r["mix"], value.r["mix"], query.scaling["mix"]) == (2 + 4, 2, 1.0)
    assert query.lora_A["mix"].dtype == torch.float32  # bf16 and fp32 adapters promote to fp32
    for t in lora_layers(both):
        got = t.weight + t.layer.delta_weight("mix")
        torch.testing.assert_close(got, expected[t.name], rtol=0, atol=1e-6)

    plain = Net()  # a model that simply has the merged weights
    with torch.no_grad():
        for name, weight in expected.items():
            plain.get_submodule(name).weight.copy_(weight)
    torch.testing.assert_close(run(both), run(plain), rtol=0, atol=1e-5)


def test_a_combination_saves_and_loads_like_any_adapter(both, tmp_path):
    combine_adapters(both, {"a": 0.5, "b": 0.5}, "mix")
    save_adapter(both, tmp_path, adapter_name="mix")
    file = read_adapter(tmp_path)
    assert (file.config["r"], file.config["lora_alpha"]) == (6, 6.0)  # scale 1 where r = 6 ...
    assert file.config["rank_pattern"] == {"layers.0.value": 2, "layers.1.value": 2}
    assert file.config["alpha_pattern"] == {"layers.0.value": 2.0, "layers.1.value": 2.0}  # ... and where r = 2
    fresh = Net()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(run(fresh), run(both), rtol=0, atol=1e-6)
    assert lora_config(both, "mix").trainable_modules == []


@pytest.mark.parametrize(
    ("weights", "name", "error", "message"),
    [
        (
            {"a": 1.0, "c": 1.0},
            "mix",
            LoRAStateError,
            r"cannot combine \['c'\]: no such adapter in the model; adapters: \['a', 'b'\]",
        ),
        ({"a": float("nan")}, "mix", LoRAConfigError, r"weights must be finite numbers, got \{'a': nan\}"),
        ({}, "mix", LoRAConfigError, r"needs at least one adapter and its weight"),
        ({"a": 1.0}, "b", LoRAStateError, r"already has an adapter named 'b'; give the combination a new name"),
    ],
)
def test_bad_combinations_are_refused(both, weights, name, error, message):
    with pytest.raises(error, match=message):
        combine_adapters(both, weights, name)
    assert adapter_names(both) == ["a", "b"]


# ------------------------------------------------------------------------ delete / disable


def test_deleting_an_adapter_gives_back_modules_no_other_adapter_uses(both, files):
    delete_adapter(both, "a")
    assert adapter_names(both) == ["b"]
    assert isinstance(both.layers[0].query, LoRALinear)
    assert type(both.layers[0].value) is nn.Linear  # only 'a' adapted value
    set_adapter(both, "b")
    assert torch.equal(run(both), run(alone(files, "b")))
    delete_adapter(both, "b")
    assert [type(m) for m in both.modules()] == [type(m) for m in Net().modules()]
    assert all(p.requires_grad for p in both.parameters())
    assert torch.equal(run(both), run(Net()))


def test_deleting_is_refused_for_unknown_and_merged_adapters(both):
    with pytest.raises(LoRAStateError, match=r"no adapter named 'c' to delete; adapters: \['a', 'b'\]"):
        delete_adapter(both, "c")
    merge_lora(both)
    with pytest.raises(
        LoRAStateError, match=r"adapter 'b' is merged into 'layers\.0\.query' .*unmerge_lora\(model\) first"
    ):
        delete_adapter(both, "b")


def test_disable_adapters_gives_the_base_model_and_restores_on_exit(both):
    adapted = run(both)
    with disable_adapters(both):
        assert torch.equal(run(both), run(Net()))
    assert torch.equal(run(both), adapted)
    with pytest.raises(KeyError), disable_adapters(both):
        raise KeyError("inside")
    assert torch.equal(run(both), adapted)


def test_disable_adapters_refuses_merged_adapters_and_plain_models(both):
    merge_lora(both)
    with (
        pytest.raises(
            LoRAStateError, match=r"while \['b'\] are merged into the base weights.*unmerge_lora\(model\) first"
        ),
        disable_adapters(both),
    ):
        pass
    unmerge_lora(both)  # W back within float32 rounding
    with disable_adapters(both):
        torch.testing.assert_close(run(both), run(Net()), rtol=0, atol=1e-6)
    with pytest.raises(LoRAStateError, match="no LoRA layers"), disable_adapters(Net()):
        pass


def test_a_new_adapter_is_active_alone_whichever_way_it_arrives(files):
    model = copy.deepcopy(alone(files, "a"))
    inject_lora(model, r=2, target_modules=["dense"], adapter_name="c")
    assert active_adapters(model) == ["c"]
    load_adapter(model, files / "b", adapter_name="b")
    assert active_adapters(model) == ["b"]
    combine_adapters(model, {"a": 1.0, "c": 1.0}, "ac")
    assert active_adapters(model) == ["ac"]


def test_loading_an_adapter_with_another_head_warns_that_heads_are_shared(tmp_path):
    model = Net()
    inject_lora(model, r=2, target_modules=["query"], trainable_modules=["head"], adapter_name="x")
    save_adapter(model, tmp_path / "x", adapter_name="x")
    with torch.no_grad():
        model.head.weight.add_(1.0)  # another task's head
    save_adapter(model, tmp_path / "y", adapter_name="x")
    both = Net()
    load_adapter(both, tmp_path / "x", adapter_name="x")
    with pytest.warns(UserWarning, match=r"set_adapter\('x'\) will run adapter 'x' with the head of adapter 'y'"):
        load_adapter(both, tmp_path / "y", adapter_name="y")
    assert torch.equal(both.head.weight, model.head.weight)
