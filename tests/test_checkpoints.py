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


class HookRecorder(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def setup(self, trainer, pl_module, stage):
        self.calls.append("callback setup")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.calls.append("callback on_load_checkpoint")

    def state_dict(self):
        return {"recorded": True}

    def load_state_dict(self, state_dict):
        self.calls.append("callback load_state_dict")

    def on_fit_start(self, trainer, pl_module):
        self.calls.append("callback on_fit_start")


class RecordedModule(L.LightningModule):
    """Records the hooks Lightning calls on it, and the ``strict`` it loads with."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls
        self.net = nn.Linear(4, 2)

    def configure_model(self):
        self.calls.append("module configure_model")

    def on_load_checkpoint(self, checkpoint):
        self.calls.append("module on_load_checkpoint")
        self.strict_loading = False  # read by Lightning only after this hook

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.calls.append(f"module load_state_dict(strict={strict})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        self.calls.append("module configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loads_the_model_weights_between_the_module_and_the_callback_hooks(tmp_path):
    """The order ``LoRACallback`` relies on to restore (checked against Lightning 2.6): its
    ``before_restore`` runs in the module's ``on_load_checkpoint``, which still comes before the
    weights load and may set ``strict_loading``; its own ``on_load_checkpoint`` comes after them.
    If a Lightning release reorders these, this test fails before any LoRA restore goes wrong."""
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    first = L.Trainer(max_epochs=1, callbacks=[HookRecorder([])], enable_checkpointing=False, **options)
    first.fit(RecordedModule([]), data)
    first.save_checkpoint(tmp_path / "one.ckpt")
    calls: list[str] = []
    resumed = L.Trainer(max_epochs=2, callbacks=[HookRecorder(calls)], enable_checkpointing=False, **options)
    resumed.fit(RecordedModule(calls), data, ckpt_path=tmp_path / "one.ckpt")
    assert calls == [
        "callback setup",
        "module configure_model",
        "module on_load_checkpoint",
        "module load_state_dict(strict=False)",
        "callback on_load_checkpoint",
        "callback load_state_dict",
        "module configure_optimizers",
        "callback on_fit_start",
    ]


def test_an_adapter_only_restore_leaves_the_module_as_it_was_built(stopped, datamodule, tmp_path):
    model = classifier(datamodule.num_classes)
    fit(tmp_path, model, datamodule, [lora()], ckpt_path=stopped, max_epochs=2)
    assert not {"configure_model", "on_load_checkpoint"} & set(vars(model))  # the class's own hooks again
    assert model.strict_loading is True


def test_a_refused_restore_changes_no_weight_of_the_merged_model(stopped, datamodule, tmp_path):
    model = classifier(datamodule.num_classes)
    merging = LoRACallback(r=4, target_modules=["query", "value"], trainable_modules=["head"])
    trainer = fit(tmp_path, model, datamodule, [merging], max_epochs=1)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAStateError, match="would add ΔW twice"):
        trainer.validate(model, datamodule=datamodule, ckpt_path=stopped)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())  # the head too
