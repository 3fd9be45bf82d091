"""The rank advisor: spectra, suggested ranks and resized adapters, on adapters whose spectrum
is known by construction (ΔW = U diag(σ) Vᵀ), checked against dense SVDs and real PEFT."""

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfigError,
    LoRAStateError,
    inject_lora,
    load_adapter,
    merge_lora,
    read_adapter,
    resize_adapter,
    save_adapter,
    spectra,
    suggest_ranks,
)
from lightning_lora.cli import main
from lightning_lora.resize import resize_adapter_file, truncate
from lightning_lora.state import adapted_weights

SIGMAS = {"a": [4.0, 2.0, 1.0, 0.5], "b": [3.0, 3.0, 0.1, 0.0]}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def with_known_spectra(alpha: float = 8.0) -> nn.Module:
    """r=4 adapters whose ΔW = s·B A has exactly the singular values SIGMAS (A = s^-½ Vᵀ,
    B = s^-½ U diag σ with orthonormal U, V)."""
    model = Net()
    inject_lora(model, r=4, alpha=alpha, target_modules=["a", "b"])
    g = torch.Generator().manual_seed(1)
    for t in adapted_weights(model):
        d_out, d_in = t.layer.d_out, t.layer.d_in
        u = torch.linalg.qr(torch.randn(d_out, 4, generator=g))[0]
        v = torch.linalg.qr(torch.randn(d_in, 4, generator=g))[0]
        s = t.layer.specs["default"].scale
        with torch.no_grad():
            t.layer.lora_A["default"].copy_(v.T / s**0.5)
            t.layer.lora_B["default"].copy_(u * torch.tensor(SIGMAS[t.name]) / s**0.5)
    return model


def test_spectra_are_the_singular_values_of_delta_w():
    found = {s.name: s for s in spectra(with_known_spectra())}
    for name, sigma in SIGMAS.items():
        torch.testing.assert_close(torch.tensor(found[name].singular_values), torch.tensor(sigma), atol=1e-5, rtol=1e-5)
    assert found["a"].shape == (10, 12) and found["a"].r == 4


def test_suggested_rank_is_the_smallest_that_keeps_the_energy():
    # a: σ² = 16, 4, 1, 0.25 of 21.25 → 75.3%, 94.1%, 98.8%, 100%
    found = {s.name: s for s in spectra(with_known_spectra())}
    a = found["a"]
    assert [a.rank_for(e) for e in (0.7, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert a.kept(2) == pytest.approx(20 / 21.25)
    assert found["b"].rank_for(0.9) == 2  # 9 + 9 of 18.01
    suggestion = suggest_ranks(with_known_spectra(), energy=0.95)
    assert suggestion.ranks == {"a": 3, "b": 2}
    assert suggestion.params == 3 * (10 + 12) + 2 * (6 + 10)
    assert suggestion.params_before == 4 * (10 + 12) + 4 * (6 + 10)
    assert suggestion.rank_pattern == {"a": 3, "b": 2}
    assert "r@90%" in suggestion.table() and "a" in suggestion.table()


def test_a_budget_spends_parameters_on_the_largest_singular_values_across_weights():
    # rank 1 each costs 22 + 16 = 38; next σ² in order: b 9 (16), a 4 (22), a 1 (22), b 0.01 ...
    model = with_known_spectra()
    assert suggest_ranks(model, budget=38).ranks == {"a": 1, "b": 1}
    assert suggest_ranks(model, budget=38 + 16).ranks == {"a": 1, "b": 2}
    assert suggest_ranks(model, budget=38 + 16 + 22).ranks == {"a": 2, "b": 2}
    assert suggest_ranks(model, budget=38 + 16 + 22 + 21).ranks == {"a": 2, "b": 2}  # a's next does not fit
    with pytest.raises(LoRAConfigError, match=r"budget=37 parameters cannot give each of the 2 weights rank 1"):
        suggest_ranks(model, budget=37)


@pytest.mark.parametrize("energy", [0.0, 1.5, -1])
def test_energy_outside_zero_one_is_refused(energy):
    with pytest.raises(LoRAConfigError, match="energy must be a share in"):
        suggest_ranks(with_known_spectra(), energy=energy)


def test_truncation_is_the_best_rank_k_approximation():
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(6, 20, generator=g), torch.randn(15, 6, generator=g)
    dense = 0.5 * B @ A
    u, s, vh = torch.linalg.svd(dense)
    for k in (1, 3, 6):
        A_k, B_k, kept = truncate(A, B, 0.5, k)
        assert A_k.shape == (k, 20) and B_k.shape == (15, k)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        torch.testing.assert_close(B_k @ A_k, best, atol=1e-4, rtol=1e-4)
        assert kept == pytest.approx(float(s[:k].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_resized_model_computes_w_plus_the_truncated_update(tmp_path):
    model = with_known_spectra()
    x = torch.randn(7, 12)
    expected = {}
    for t in adapted_weights(model):
        A_k, B_k, _ = truncate(*t.layer.update("default"), 2 if t.name == "a" else 1)
        expected[t.name] = t.weight.detach() + B_k @ A_k
    resize_adapter(model, ranks={"a": 2, "b": 1})
    ref = Net()
    with torch.no_grad():
        ref.a.weight.copy_(expected["a"])
        ref.b.weight.copy_(expected["b"])
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "small")
    file = read_adapter(tmp_path / "small")
    assert {n: file.rank(n) for n in file.pairs} == {"a": 2, "b": 1}
    assert file.scaling("a") == pytest.approx(1.0) and file.scaling("b") == pytest.approx(1.0)
    fresh = Net()
    load_adapter(fresh, tmp_path / "small")
    torch.testing.assert_close(fresh(x), ref(x), atol=1e-5, rtol=1e-5)


def test_resized_adapter_loads_into_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = with_known_spectra()
    resize_adapter(model, energy=0.95)
    save_adapter(model, tmp_path / "small")
    x = torch.randn(5, 12)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "small")
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)


def test_suggestion_from_a_directory_equals_the_one_from_the_model(tmp_path):
    model = with_known_spectra()
    save_adapter(model, tmp_path / "full")
    assert suggest_ranks(tmp_path / "full", energy=0.9).ranks == suggest_ranks(model, energy=0.9).ranks


def test_resize_refuses_a_merged_adapter_and_changes_nothing():
    model = with_known_spectra()
    merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAStateError, match="is merged into"):
        resize_adapter(model, ranks=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resize_refuses_unknown_names_and_bad_ranks():
    with pytest.raises(LoRAConfigError, match=r"names weights that are not adapted: \['c'\]"):
        resize_adapter(with_known_spectra(), ranks={"c": 1})
    with pytest.raises(LoRAConfigError, match="must be positive ints"):
        resize_adapter(with_known_spectra(), ranks={"a": 0})


def test_a_file_resized_without_a_model_equals_the_model_resized(tmp_path):
    model = with_known_spectra()
    save_adapter(model, tmp_path / "full")
    suggestion = resize_adapter_file(tmp_path / "full", tmp_path / "small", energy=0.95)
    file = read_adapter(tmp_path / "small")
    assert {n: file.rank(n) for n in file.pairs} == suggestion.ranks == {"a": 3, "b": 2}
    assert file.extras["resized"]["energy_kept"] == pytest.approx(suggestion.kept)
    in_memory = with_known_spectra()
    resize_adapter(in_memory, energy=0.95)
    from_file = Net()
    load_adapter(from_file, tmp_path / "small")
    x = torch.randn(4, 12)
    torch.testing.assert_close(from_file(x), in_memory(x), atol=1e-5, rtol=1e-5)


def test_suggest_and_resize_from_the_command_line(tmp_path, capsys):
    save_adapter(with_known_spectra(), tmp_path / "full")
    assert main(["suggest", str(tmp_path / "full"), "--energy", "0.95"]) == 0
    table = capsys.readouterr().out
    assert "r@90%" in table and "95% of each ‖ΔW‖²: 98 parameters in A/B instead of 152" in table
    assert main(["resize", str(tmp_path / "full"), "--rank", "1", "--output", str(tmp_path / "r1")]) == 0
    assert {read_adapter(tmp_path / "r1").rank(n) for n in ("a", "b")} == {1}
    assert main(["resize", str(tmp_path / "full"), "--rank", "1", "--output", str(tmp_path / "r1")]) == 2  # exists
    assert main(["resize", str(tmp_path / "full"), "--rank", "1", "--output", str(tmp_path / "full")]) == 2
    assert "already holds an adapter; pass --force" in capsys.readouterr().err
