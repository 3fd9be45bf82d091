"""A merged model knows it is merged: ΔW is never added twice, whichever object or callback
restores it. The merge record lives on the model object; the base fingerprint travels in the
adapter-only checkpoint; state dicts stay plain (strict loading into a model that never saw
lightning-lora keeps working)."""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    LoRACallback,
    LoRAStateError,
    inject_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.names import CHECKPOINT_KEY
from lightning_lora.provenance import base_fingerprint, check_base, merge_records
from lightning_lora.state import has_lora

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.query, self.value, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        h = torch.tanh(self.query(x)) * self.value(x)
        return self.head(h + self.attn(h[None], h[None], h[None], need_weights=False)[0][0])


def trained(model=None, seed=1):
    model = model or Net()
    inject_lora(model, r=2, target_modules=["query", "value", "attn"], mha_projections=["q", "v"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def outputs(model):
    with torch.no_grad():
        return model(X)


# ------------------------------------------------------------------------------ the merge record


def test_a_merge_leaves_a_record_on_the_model_that_outlives_unloading_and_copies():
    model = trained()
    assert merge_records(model) == {}
    unload_lora(model, merge=True)
    records = merge_records(model)
    assert sorted(records) == ["attn.in_proj_weight[q]", "attn.in_proj_weight[v]", "attn.out_proj", "query", "value"]
    assert {r.adapter for rs in records.values() for r in rs} == {"default"}
    assert merge_records(copy.deepcopy(model)) == records
    assert type(model.query) is nn.Linear  # the plain module carries it


def test_the_record_never_reaches_the_state_dict_which_loads_strictly_into_a_model_that_never_saw_lora():
    model = trained()
    expected = outputs(model)
    unload_lora(model, merge=True)
    fresh = Net()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(Net().state_dict())
    torch.testing.assert_close(outputs(fresh), expected)


def test_unmerging_removes_the_record_and_so_does_unloading_without_merge():
    model = trained()
    merge_lora(model)
    assert merge_records(model)
    unmerge_lora(model)
    assert merge_records(model) == {}
    merge_lora(model)
    unload_lora(model, merge=False)
    assert merge_records(model) == {}


def test_loading_an_adapter_into_the_model_it_is_merged_into_is_refused_and_changes_nothing(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "a")
    unload_lora(model, merge=True)
    state, before = copy.deepcopy(model.state_dict()), outputs(model)
    with pytest.raises(LoRAStateError, match=r"is merged into 'attn.in_proj_weight\[q\]' of this model already"):
        load_adapter(model, tmp_path / "a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(outputs(model), before)
    other = trained(seed=3)  # another adapter on the merged weights: allowed
    save_adapter(other, tmp_path / "b")
    load_adapter(model, tmp_path / "b")


# --------------------------------------------------------------------------- the base fingerprint


@pytest.fixture
def checkpoint(tmp_path):
    """An adapter-only checkpoint as the callback writes it, plus the base fingerprint, saved
    and read back with weights_only=True."""
    model = trained()
    path = tmp_path / "adapter_only.ckpt"
    marker = {"adapter_only": True, "base_fingerprint": base_fingerprint(model, "default")}
    torch.save({"state_dict": lora_state_dict(model), CHECKPOINT_KEY: marker}, path)
    return torch.load(path, weights_only=True), model


def restore(model, checkpoint):
    """What a restore does: inject, check the base, load the adapter-only state dict."""
    if not has_lora(model):
        inject_lora(model, r=2, target_modules=["query", "value", "attn"], mha_projections=["q", "v"])
    check_base(model, checkpoint[CHECKPOINT_KEY]["base_fingerprint"], "default", checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    return model


def test_the_adapter_restores_onto_the_base_it_was_trained_on(checkpoint):
    ckpt, trained_model = checkpoint
    torch.testing.assert_close(outputs(restore(Net(), ckpt)), outputs(trained_model))


def test_restoring_onto_merged_weights_in_the_same_object_is_refused(checkpoint):
    ckpt, model = checkpoint
    unload_lora(model, merge=True)
    with pytest.raises(LoRAStateError, match=r"already hold this adapter's ΔW: .* would add ΔW twice"):
        restore(model, ckpt)


def test_restoring_onto_merged_weights_in_a_new_object_is_refused(checkpoint):
    """The case no object record can catch: a model that never saw lightning-lora, given the
    merged state dict. Without the check the result is W + 2ΔW."""
    ckpt, model = checkpoint
    expected = outputs(model)
    unload_lora(model, merge=True)
    fresh = Net()
    fresh.load_state_dict(model.state_dict())
    assert merge_records(fresh) == {}
    with pytest.raises(LoRAStateError, match=r"already hold this adapter's ΔW"):
        restore(fresh, ckpt)
    doubled = Net()  # what the restore would have made
    doubled.load_state_dict(model.state_dict())
    inject_lora(doubled, r=2, target_modules=["query", "value", "attn"], mha_projections=["q", "v"])
    doubled.load_state_dict(ckpt["state_dict"], strict=False)
    assert (outputs(doubled) - expected).abs().max() > 1e-2


def test_a_base_cast_to_bfloat16_is_still_the_same_base(checkpoint):
    ckpt, _ = checkpoint
    restore(Net().to(torch.bfloat16), ckpt)  # no error


def test_another_base_is_refused_by_name(checkpoint):
    ckpt, _ = checkpoint
    with pytest.raises(LoRAStateError, match=r"base weights are not the ones this adapter was trained on: 5 of"):
        restore(Net(seed=7), ckpt)


# ------------------------------------------------------- end to end: a real Trainer and LoRACallback


class Module(L.LightningModule):
    """A plain LightningModule: the callback writes the fingerprint into the adapter-only
    checkpoint and checks it before the state dict loads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)), 16)


def test_a_new_callback_restoring_into_merged_weights_in_a_new_model_object_is_refused(tmp_path: Path):
    kwargs = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    kwargs["default_root_dir"] = tmp_path  # the adapter goes to <default_root_dir>/lora_adapter
    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = Module()
    L.Trainer(max_steps=8, callbacks=[LoRACallback(r=2, target_modules=["net.0"]), saving], **kwargs).fit(
        model, loader()
    )
    merged = Module()  # a new object, given the merged weights: no record, only the weights know
    merged.load_state_dict(model.state_dict())
    tester = L.Trainer(callbacks=[LoRACallback(r=2, target_modules=["net.0"])], **kwargs)
    with pytest.raises(LoRAStateError, match=r"already hold this adapter's ΔW"):
        tester.test(merged, loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    tester = L.Trainer(callbacks=[LoRACallback(r=2, target_modules=["net.0"])], **kwargs)
    tester.test(Module(), loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)  # a fresh base: fine
