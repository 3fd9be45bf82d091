"""Adapter-only Lightning checkpoints: what they hold, exact resume on a fresh model, the errors.

The model is the example task's TextClassifier (AdamW, warm-up + linear-decay LambdaLR) over a
tiny random BERT, trained on the real DocstringDataModule.
"""

import csv
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lightning_lora import LoRACallback, LoRAStateError, lora_state_dict
from lightning_lora.callback import CHECKPOINT_KEY
from lightning_lora.task import DocstringDataModule, TextClassifier, pad_collate, tiny_bert

STEPS_PER_EPOCH = 3


class EpochShuffle(Sampler[int]):
    """A new order every epoch that depends only on (seed, epoch): Lightning calls ``set_epoch``
    at each epoch start, so a resumed run draws the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class Docstrings(DocstringDataModule):
    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffle(len(data)),
            collate_fn=partial(pad_collate, pad_id=self.pad_id),
        )


class StopAfterEpoch(Callback):
    """Stops fit after ``epoch`` epochs, as if the job had been killed right after that checkpoint."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


class BatchRecorder(Callback):
    """The labels of the batch each global step trained on."""

    def __init__(self) -> None:
        self.labels: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels[trainer.global_step] = batch["labels"].tolist()


@pytest.fixture(scope="module")
def datamodule():
    dm = Docstrings(batch_size=16, max_length=32, limit_train=16 * STEPS_PER_EPOCH, limit_val=16)
    dm.setup("fit")
    return dm


def classifier(num_classes: int) -> TextClassifier:
    """The same model every call; no dropout anywhere, so a step is a function of the weights
    and the batch (Lightning does not restore the global RNG on resume)."""
    L.seed_everything(0)
    encoder = tiny_bert()
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return TextClassifier(encoder, num_classes=num_classes, lr=5e-3, warmup_ratio=0.3, dropout=0.0)


def lora(**kwargs) -> LoRACallback:
    kwargs.setdefault("target_modules", ["query", "value"])
    return LoRACallback(r=4, trainable_modules=["head"], merge_on_fit_end=False, **kwargs)


def fit(root: Path, model, datamodule, callbacks, ckpt_path=None, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 3)
    trainer = L.Trainer(
        accelerator="cpu",
        deterministic=True,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=CSVLogger(root, name="logs"),
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def step_losses(trainer: L.Trainer) -> dict[int, float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")}


def checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def uninterrupted(datamodule, tmp_path_factory):
    """Three epochs in one go, and the adapter it ends with."""
    model = classifier(datamodule.num_classes)
    trainer = fit(tmp_path_factory.mktemp("uninterrupted"), model, datamodule, [lora()])
    return step_losses(trainer), lora_state_dict(model)


@pytest.fixture(scope="module")
def stopped(datamodule, tmp_path_factory):
    """The same job killed after its first epoch; its checkpoint directory."""
    root = tmp_path_factory.mktemp("stopped")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(root, classifier(datamodule.num_classes), datamodule, [lora(), checkpoint, StopAfterEpoch(1)])
    (path,) = checkpoints(root / "ckpt")
    return path


def test_checkpoint_holds_adapters_trainable_modules_optimizer_and_config_not_the_base(stopped, datamodule):
    checkpoint = torch.load(stopped, weights_only=True)  # plain tensors and containers: no pickle needed
    model = classifier(datamodule.num_classes)
    keys = set(checkpoint["state_dict"])
    assert keys == {k for k in keys if ".lora_" in k or k.startswith("head.")}
    assert {"head.weight", "head.bias"} < keys
    assert len([k for k in keys if ".lora_A." in k]) == 2 * 2  # query and value, 2 layers
    marker = checkpoint[CHECKPOINT_KEY]
    assert marker["adapter_only"] is True and marker["adapter_keys"] == list(checkpoint["state_dict"])
    assert marker["config"]["r"] == 4 and marker["config"]["trainable_modules"] == ["head"]
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["param_groups"][0]["params"]) == len(keys)  # AdamW state for trained tensors only
    assert len(optimizer["state"]) == len(keys)
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == STEPS_PER_EPOCH
    saved_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    base_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert saved_bytes < base_bytes / 100


def test_resumed_run_logs_exactly_the_losses_of_the_uninterrupted_run(stopped, uninterrupted, datamodule, tmp_path):
    expected_losses, expected_adapter = uninterrupted
    model = classifier(datamodule.num_classes)  # a freshly built model: no LoRA yet
    trainer = fit(tmp_path, model, datamodule, [lora()], ckpt_path=stopped)
    resumed = step_losses(trainer)
    assert sorted(resumed) == list(range(STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH))
    assert resumed == {step: expected_losses[step] for step in resumed}  # exact: no tolerance
    adapter = lora_state_dict(model)
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)
    assert model.strict_loading is True  # never switched off: only the base keys were excused, once
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"head.weight": model.head.weight})


def test_full_checkpoints_keep_the_base_too(datamodule, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    model = classifier(datamodule.num_classes)
    fit(tmp_path, model, datamodule, [lora(full_checkpoints=True), checkpoint], max_steps=1)
    saved = torch.load(checkpoints(tmp_path / "ckpt")[0], weights_only=True)
    assert list(saved["state_dict"]) == list(model.state_dict())
    assert saved[CHECKPOINT_KEY]["adapter_only"] is False


def test_resuming_with_another_lora_config_names_both_configs(stopped, datamodule, tmp_path):
    other = lora(target_modules=["query"])
    with pytest.raises(LoRAStateError) as err:
        fit(tmp_path, classifier(datamodule.num_classes), datamodule, [other], ckpt_path=stopped)
    message = str(err.value)
    assert "adapter-only checkpoint holds LoRA tensors this model has no place for" in message
    assert "attention.self.value.lora_A.default" in message
    assert "'target_modules': ['query', 'value']" in message and "'target_modules': ['query']" in message


def test_a_fresh_model_without_the_callback_refuses_an_adapter_only_checkpoint(stopped, datamodule, tmp_path):
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict.*embeddings"):
        fit(tmp_path, classifier(datamodule.num_classes), datamodule, [], ckpt_path=stopped)


def test_mid_epoch_resume_restarts_that_epochs_data_from_its_first_batch(datamodule, tmp_path):
    """Lightning restores the step counters but not a plain DataLoader's position: the rest of
    the interrupted epoch sees that epoch's first batches again (and never its last ones); from
    the next epoch on the order is the uninterrupted run's again."""
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    first = BatchRecorder()
    fit(tmp_path / "a", classifier(datamodule.num_classes), datamodule, [lora(), every_step, first], max_epochs=2)
    mid_epoch = next(p for p in checkpoints(tmp_path / "ckpt") if p.name.endswith("step=1.ckpt"))
    resumed = BatchRecorder()
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        trainer = fit(
            tmp_path / "b", classifier(datamodule.num_classes), datamodule, [lora(), resumed], mid_epoch, max_epochs=2
        )
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert sorted(resumed.labels) == list(range(1, 2 * STEPS_PER_EPOCH))
    assert resumed.labels[1] == first.labels[0]  # epoch 0 starts over...
    assert resumed.labels[2] == first.labels[1]
    assert all(resumed.labels[s] == first.labels[s] for s in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
