"""LoRACallback on real Lightning Trainers: an MLP, an nn.Transformer, a configure_model module."""

import copy
import csv
import dataclasses
import functools
import inspect
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRALinear,
    LoRAStateError,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    parameter_stats,
    unload_lora,
)
from lightning_lora.io import adapter_tensors


class Classifier(L.LightningModule):
    """Shared training logic: cross-entropy on (x, y), AdamW over self.parameters()."""

    fail_at_step: int | None = None
    failure: BaseException = RuntimeError("boom")

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise self.failure
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class MLP(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.net(x))


class Seq2Class(Classifier):
    """A torch.nn.Transformer (encoder and decoder: self- and cross-attention MHA modules)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.transformer = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x).unsqueeze(1).repeat(1, 4, 1)
        return self.head(self.transformer(h, h).mean(1))


class LazyMLP(Classifier):
    """Builds its layers in configure_model, so they do not exist at callback setup."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is not None:
            return
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)


CASES = {
    "mlp": (MLP, {"target_modules": ["net.0", "net.2"], "trainable_modules": ["head"]}),
    "transformer": (Seq2Class, {"target_modules": ["self_attn", "multihead_attn"], "init": "gaussian"}),
    "configure_model": (LazyMLP, {"target_modules": "all-linear"}),
}


def loader(n=64):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=16
    )


def trainer(tmp_path, callbacks, **kwargs):
    kwargs.setdefault("logger", CSVLogger(tmp_path / "logs", name="run"))
    kwargs.setdefault("max_steps", 6)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def built(module_cls):
    torch.manual_seed(0)
    module = module_cls()
    module.configure_model()
    return module


def base_state(module):
    """State dict of the model without LoRA, without touching ``module``."""
    return unload_lora(copy.deepcopy(module), merge=False).state_dict()


def csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("case", CASES)
def test_trains_only_lora_and_keeps_base_weights_bit_identical(case, tmp_path):
    module_cls, fields = CASES[case]
    torch.manual_seed(0)
    module = module_cls()
    reference = built(module_cls)
    callback = LoRACallback(merge_on_fit_end=False, r=2, **fields)
    run = trainer(tmp_path, [callback])
    run.fit(module, loader())

    lora = {id(p) for p in lora_parameters(module)}
    trainable = lora | {id(p) for p in module.head.parameters()} if "trainable_modules" in fields else lora
    optimizer_params = [p for opt in run.optimizers for g in opt.param_groups for p in g["params"]]
    assert optimizer_params and all(id(p) in trainable for p in optimizer_params)
    assert {id(p) for p in optimizer_params} == trainable

    trained = base_state(module)
    for key, value in reference.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(trained[key], value), f"{key} changed"
    assert any(p.abs().sum() > 0 for p in lora_parameters(module) if p.dim() == 2)

    rows = csv_metrics(Path(run.logger.log_dir))
    ratios = [float(r["lora/trainable_ratio"]) for r in rows if r.get("lora/trainable_ratio")]
    assert ratios == [pytest.approx(parameter_stats(module).ratio)]
    assert 0 < ratios[0] < 1


@pytest.mark.parametrize("case", CASES)
def test_default_merge_gives_a_plain_model_equal_to_the_unmerged_one(case, tmp_path):
    module_cls, fields = CASES[case]
    torch.manual_seed(0)
    module = module_cls()
    reference = built(module_cls)
    run = trainer(tmp_path, [LoRACallback(r=2, **fields)])
    run.fit(module, loader())

    assert [type(m) for m in module.modules()] == [type(m) for m in reference.modules()]
    assert list(module.state_dict()) == list(reference.state_dict())
    adapter_dir = Path(run.log_dir) / "lora_adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    load_adapter(reference, adapter_dir)  # the unmerged model: base + saved adapter
    x = torch.randn(10, 8)
    module.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-5)


def test_fit_twice_does_not_inject_twice(tmp_path):
    module = MLP()
    callback = LoRACallback(r=2, target_modules=["net.0"], merge_on_fit_end=False)
    trainer(tmp_path / "a", [callback]).fit(module, loader())
    first = [n for n, _ in module.named_parameters()]
    trainer(tmp_path / "b", [callback]).fit(module, loader())
    assert [n for n, _ in module.named_parameters()] == first
    assert not isinstance(module.net[0].base_layer, LoRALinear)


def test_group_left_empty_by_freezing_is_a_clear_error(tmp_path):
    class TwoGroups(MLP):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": self.net.parameters()}, {"params": self.head.parameters(), "lr": 0.1}])

    with pytest.raises(
        LoRAStateError, match=r"param group 1 of optimizer 0 \(AdamW\) holds only frozen.*'head\.weight'"
    ):
        trainer(tmp_path, [LoRACallback(target_modules=["net.0"])]).fit(TwoGroups(), loader())


def test_lora_parameters_missing_from_every_optimizer_is_a_clear_error(tmp_path):
    class HeadOnlyOptimizer(MLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.head.parameters())

    with pytest.raises(LoRAStateError, match=r"in no optimizer and would never train.*net\.0\.lora_A\.default"):
        trainer(tmp_path, [LoRACallback(target_modules=["net.0"], trainable_modules=["head"])]).fit(
            HeadOnlyOptimizer(), loader()
        )


def test_optimizer_factory_builds_over_lora_parameters_with_its_scheduler(tmp_path):
    callback = LoRACallback(
        target_modules=["net.0"],
        merge_on_fit_end=False,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    module = MLP()
    run = trainer(tmp_path, [callback], max_steps=3)
    run.fit(module, loader())
    (optimizer,) = run.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in lora_parameters(module)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**3)


def assert_saved_equals_in_memory(directory: Path, module: nn.Module) -> None:
    saved = load_file(directory / "adapter_model.safetensors")
    in_memory = adapter_tensors(module)
    assert saved.keys() == in_memory.keys()
    for key, tensor in in_memory.items():
        assert torch.equal(saved[key], tensor), key


def test_a_crash_leaves_the_adapter_of_that_moment_on_disk(tmp_path):
    module = MLP()
    module.fail_at_step = 3
    adapter_dir = tmp_path / "adapter"
    callback = LoRACallback(target_modules=["net.0"], trainable_modules=["head"], adapter_dir=str(adapter_dir))
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [callback]).fit(module, loader())
    assert_saved_equals_in_memory(adapter_dir / "last", module)
    assert isinstance(module.net[0], LoRALinear)  # not merged: fit did not end
    saved = load_file(adapter_dir / "last" / "adapter_model.safetensors")
    assert saved["base_model.model.net.0.lora_B.weight"].abs().sum() > 0  # three steps were trained
    assert "base_model.model.head.weight" in saved


def test_ctrl_c_saves_the_adapter_to_the_log_dir_before_lightning_exits(tmp_path):
    module = MLP()
    module.fail_at_step, module.failure = 2, KeyboardInterrupt()
    run = trainer(tmp_path, [LoRACallback(target_modules=["net.0"])])
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, after on_exception
            run.fit(module, loader())
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores further Ctrl-C from then on
    assert_saved_equals_in_memory(Path(run.log_dir) / "lora_adapter" / "last", module)


class Poison(Callback):
    """The adapter diverged in the last step: one B entry is Inf when fit ends."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net[0].lora_B["default"][0, 0] = float("inf")


def test_a_poisoned_adapter_is_saved_but_never_merged_at_fit_end(tmp_path):
    module = MLP()
    base = module.net[0].weight.detach().clone()
    adapter_dir = tmp_path / "adapter"
    callback = LoRACallback(target_modules=["net.0"], adapter_dir=str(adapter_dir))
    with pytest.raises(
        LoRAStateError, match=r"into 'net\.0' gives NaN or Inf in torch\.float32; no weight was changed"
    ):
        trainer(tmp_path, [callback, Poison()]).fit(module, loader())
    assert isinstance(module.net[0], LoRALinear) and torch.equal(module.net[0].weight, base)
    assert_saved_equals_in_memory(adapter_dir, module)  # saved before the merge was tried: nothing lost
    assert torch.isinf(
        load_file(adapter_dir / "adapter_model.safetensors")["base_model.model.net.0.lora_B.weight"]
    ).any()


def test_stats_and_config_reach_every_logger(tmp_path):
    loggers = [CSVLogger(tmp_path, name="one"), CSVLogger(tmp_path, name="two")]
    module = MLP()
    trainer(tmp_path, [LoRACallback(r=2, target_modules=["net.0"], merge_on_fit_end=False)], logger=loggers).fit(
        module, loader()
    )
    stats = parameter_stats(module)
    for logger in loggers:
        rows = [r for r in csv_metrics(Path(logger.log_dir)) if r.get("lora/trainable_params")]
        assert int(float(rows[0]["lora/trainable_params"])) == stats.trainable
        assert int(float(rows[0]["lora/total_params"])) == stats.total
        assert "r: 2" in (Path(logger.log_dir) / "hparams.yaml").read_text()


def test_log_analysis_reports_what_the_adapter_learned(tmp_path):
    module = MLP()
    callback = LoRACallback(r=4, target_modules=["net.0", "net.2"], log_analysis=True)
    run = trainer(tmp_path, [callback])
    run.fit(module, loader())
    rows = [r for r in csv_metrics(Path(run.logger.log_dir)) if r.get("lora_delta/effective_rank_mean")]
    (row,) = rows
    assert 1.0 <= float(row["lora_delta/effective_rank_mean"]) <= 4.0  # between 1 and r
    assert 0.0 < float(row["lora_delta/relative_norm_max"]) < 1.0  # ΔW small next to W after 6 steps


def test_flat_keywords_and_hydra_node_build_the_same_callback():
    node = {"_target_": "lightning_lora.LoRACallback", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    from_hydra = instantiate(node)
    flat = LoRACallback(r=4, alpha=8, target_modules=["query", "value"])
    assert from_hydra.config == flat.config
    assert from_hydra.config.target_modules == ["query", "value"]


def test_unknown_keyword_names_the_field():
    with pytest.raises(LoRAConfigError, match=r"no field 'lora_alpha' \(did you mean 'alpha'\?\)"):
        LoRACallback(lora_alpha=16)


def test_every_lora_config_field_is_a_typed_documented_keyword_with_its_default():
    """So LightningCLI, which passes callback arguments by signature, reaches each field, and a
    field added to LoRAConfig cannot be forgotten here."""
    parameters = inspect.signature(LoRACallback.__init__).parameters
    assert [name for name in parameters if name in LoRAConfig.field_names()] == LoRAConfig.field_names()
    for field in dataclasses.fields(LoRAConfig):
        parameter = parameters[field.name]
        assert parameter.kind is parameter.KEYWORD_ONLY and parameter.annotation is not parameter.empty
        # A list field defaults to None, which stands for LoRAConfig's own default list.
        assert parameter.default == (None if field.default is dataclasses.MISSING else field.default), field.name
        assert f"\n        {field.name}: " in LoRACallback.__doc__, f"{field.name} is not documented"
    assert LoRACallback().config == LoRAConfig()


def test_a_whole_config_or_flat_fields_but_a_value_given_both_ways_is_an_error_naming_it():
    assert LoRACallback(LoRAConfig(r=2)).config.r == 2
    assert LoRACallback({"r": 2, "target_modules": ["net.0"]}).config == LoRAConfig(r=2, target_modules=["net.0"])
    with pytest.raises(LoRAConfigError, match=r"config=\.\.\. and flat LoRA fields \{'alpha': 4\}"):
        LoRACallback(LoRAConfig(r=2), alpha=4)


def test_the_logged_options_are_the_hydra_node_that_rebuilds_the_callback():
    callback = LoRACallback(
        r=4,
        target_modules=["net.0"],
        merge_on_fit_end=False,
        adapter_dir="adapters/a",
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )
    node = callback.hyperparameters()
    assert node["_target_"] == "lightning_lora.LoRACallback"
    assert node["optimizer"] == {"_target_": "torch.optim.sgd.SGD", "_partial_": True, "lr": 0.5}
    rebuilt = instantiate(node)
    assert rebuilt.config == callback.config and rebuilt.hyperparameters() == node


def test_without_hydra_the_callback_logs_its_config_and_every_option(tmp_path):
    run = trainer(tmp_path, [LoRACallback(r=2, target_modules=["net.0"], merge_on_fit_end=False)])
    run.fit(MLP(), loader())
    logged = yaml.safe_load((Path(run.logger.log_dir) / "hparams.yaml").read_text())["lora"]
    assert (logged["r"], logged["target_modules"], logged["merge_on_fit_end"]) == (2, ["net.0"], False)
    assert logged["adapter_dir"] is None and logged["full_checkpoints"] is False and logged["optimizer"] is None


def test_strip_frozen_parameters_is_plain_torch_and_still_importable_from_the_callback():
    from lightning_lora.callback import strip_frozen_parameters
    from lightning_lora.optim import strip_frozen_parameters as plain

    assert strip_frozen_parameters is plain


def test_restoring_a_lora_checkpoint_onto_the_merged_model_is_refused(tmp_path):
    module = MLP()
    run = trainer(tmp_path, [LoRACallback(target_modules=["net.0"])], enable_checkpointing=True)
    run.fit(module, loader(), loader())
    assert isinstance(module.net[0], nn.Linear)  # merged at fit end
    with pytest.raises(LoRAStateError, match="would add ΔW twice"):
        run.validate(module, loader(), ckpt_path=run.checkpoint_callback.best_model_path)


def test_a_lora_checkpoint_evaluates_on_a_freshly_built_model(tmp_path):
    torch.manual_seed(0)
    module = MLP()
    fresh = copy.deepcopy(module)
    callback = LoRACallback(target_modules=["net.0"], merge_on_fit_end=False)
    run = trainer(tmp_path, [callback], enable_checkpointing=True)
    run.fit(module, loader(), loader())
    trained = run.validate(module, loader())[0]["val/loss"]
    restored = trainer(tmp_path / "eval", [callback]).validate(
        fresh, loader(), ckpt_path=run.checkpoint_callback.best_model_path
    )
    assert isinstance(fresh.net[0], LoRALinear)
    assert restored[0]["val/loss"] == pytest.approx(trained, abs=1e-6)


def test_adapter_state_dict_matches_the_saved_file(tmp_path):
    module = MLP()
    callback = LoRACallback(target_modules=["net.0"], trainable_modules=["head"], merge_on_fit_end=False)
    run = trainer(tmp_path, [callback])
    run.fit(module, loader())
    saved = load_file(Path(run.log_dir) / "lora_adapter" / "adapter_model.safetensors")
    state = lora_state_dict(module)
    assert len(saved) == len(state) == 4
    assert torch.equal(saved["base_model.model.head.weight"], state["head.weight"])
