"""What LoRACallback does around a fit with real Trainers: checks before any step trains, files
that load into the served Hugging Face model, the merge report and the rank advice in the logs,
and checkpoints loaded as data only."""

import csv
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import AdapterSaveError, LoRACallback, read_adapter
from lightning_lora.errors import CheckpointError

from .hf_models import llama

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "logger": False}


class MLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


class CausalLM(L.LightningModule):
    """A Hugging Face model held under an attribute name of the user's choosing."""

    def __init__(self):
        super().__init__()
        self.language_model = llama()

    def training_step(self, batch, batch_idx):
        return self.language_model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)), 16)


def token_loader():
    return DataLoader(torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0)), batch_size=4)


class StepCounter(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


# ------------------------------------------------------------------ checked before any step trains


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_unusable_adapter_dir_stops_the_fit_before_any_step(tmp_path, kind):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" if kind == "a file" else tmp_path / "file" / "adapter"
    counter = StepCounter()
    callbacks = [LoRACallback(r=2, target_modules=["net.0"], adapter_dir=str(target)), counter]
    with pytest.raises(AdapterSaveError, match=r"is a file"):
        L.Trainer(max_steps=4, callbacks=callbacks, default_root_dir=tmp_path, **TRAINER).fit(MLP(), loader())
    assert counter.steps == 0
    assert not (tmp_path / "file" / "last").exists()  # and no crash save into it either


def test_a_second_fit_into_the_same_adapter_dir_is_refused_unless_overwrite(tmp_path):
    directory = tmp_path / "adapter"
    first = L.Trainer(max_steps=2, callbacks=[LoRACallback(r=2, target_modules=["net.0"], adapter_dir=str(directory))],
                      default_root_dir=tmp_path, **TRAINER)  # fmt: skip
    model = MLP()
    first.fit(model, loader())
    saved = read_adapter(directory).pairs["net.0"][1].clone()
    counter = StepCounter()
    again = LoRACallback(r=2, target_modules=["net.0"], adapter_dir=str(directory))
    with pytest.raises(AdapterSaveError, match=r"already holds an adapter .*merged adapter.*overwrite=True"):
        L.Trainer(max_steps=2, callbacks=[again, counter], default_root_dir=tmp_path, **TRAINER).fit(model, loader())
    assert counter.steps == 0 and torch.equal(read_adapter(directory).pairs["net.0"][1], saved)
    replace = LoRACallback(r=2, target_modules=["net.0"], adapter_dir=str(directory), overwrite=True)
    L.Trainer(max_steps=3, callbacks=[replace], default_root_dir=tmp_path, **TRAINER).fit(MLP(), loader())
    assert not torch.equal(read_adapter(directory).pairs["net.0"][1], saved)  # 3 steps instead of 2: replaced


def test_the_same_callback_continues_its_own_unmerged_adapter(tmp_path):
    callback = LoRACallback(r=2, target_modules=["net.0"], adapter_dir=str(tmp_path / "a"), merge_on_fit_end=False)
    model = MLP()
    L.Trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path, **TRAINER).fit(model, loader())
    first = read_adapter(tmp_path / "a").pairs["net.0"][1].clone()
    L.Trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path, **TRAINER).fit(model, loader())
    assert not torch.equal(read_adapter(tmp_path / "a").pairs["net.0"][1], first)


# ------------------------------------------------------------------ files for the served model


def test_trained_in_lightning_the_adapter_loads_into_the_bare_hf_model_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    module = CausalLM()
    fresh = llama()  # the same random weights, built again (seeded)
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], adapter_dir=str(tmp_path / "adapter"),
                            merge_on_fit_end=False)  # fmt: skip
    L.Trainer(max_steps=3, callbacks=[callback], default_root_dir=tmp_path, **TRAINER).fit(module, token_loader())
    file = read_adapter(tmp_path / "adapter")
    assert file.extras["root"] == "language_model"
    assert all(name.startswith("model.layers.") for name in file.pairs)
    ids = next(iter(token_loader()))
    module.eval()
    with torch.no_grad():
        expected = module.language_model(input_ids=ids).logits
        served = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        torch.testing.assert_close(served(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ what the loggers get at fit end


def logged_metrics(directory: Path) -> dict[str, float]:
    rows = list(csv.DictReader((directory / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}


def test_the_merge_report_and_the_rank_advice_reach_every_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    callback = LoRACallback(r=4, target_modules=["net.0", "net.2"], log_rank_advice=True)
    trainer = L.Trainer(max_steps=6, callbacks=[callback], **{**TRAINER, "logger": logger})
    trainer.fit(MLP(), loader())
    metrics = logged_metrics(Path(logger.log_dir))
    assert metrics["lora/merge_within_dtype"] == 1.0
    assert 0 <= metrics["lora/merge_output_max_rel_diff"] <= metrics["lora/merge_output_tolerance"]
    assert metrics["lora/merge_weight_max_ulps"] <= 0.5
    for tag in ("90", "95", "99"):
        assert 0 < metrics[f"lora_advice/params_share_at_{tag}"] <= 1
    assert metrics["lora_advice/mean_rank_at_90"] <= metrics["lora_advice/mean_rank_at_99"] <= 4


def test_a_probe_that_fails_skips_the_report_not_the_merge(tmp_path):
    def probe(module, batch):
        raise ValueError("no way to run this")

    model = MLP()
    callback = LoRACallback(r=2, target_modules=["net.0"], merge_probe=probe)
    with pytest.warns(UserWarning, match=r"merge report skipped: the probe batch failed \(ValueError"):
        L.Trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path, **TRAINER).fit(model, loader())
    assert type(model.net[0]) is nn.Linear  # merged and unloaded all the same


# ------------------------------------------------------------------ checkpoints load as data only


class Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_in_a_checkpoint_never_runs_even_when_the_environment_allows_it(tmp_path, monkeypatch):
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = MLP()
    callbacks = [LoRACallback(r=2, target_modules=["net.0"], merge_on_fit_end=False), saving]
    L.Trainer(max_steps=2, callbacks=callbacks, default_root_dir=tmp_path, **TRAINER).fit(model, loader())
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["extra"] = Payload(str(marker))
    hostile = tmp_path / "hostile.ckpt"
    with hostile.open("wb") as f:
        torch.save(checkpoint, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    tester = L.Trainer(max_steps=4, callbacks=[LoRACallback(r=2, target_modules=["net.0"])], default_root_dir=tmp_path,
                       **TRAINER)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"cannot be loaded with torch.load\(weights_only=True\)"):
        tester.fit(MLP(), loader(), ckpt_path=hostile)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
