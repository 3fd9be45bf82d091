"""Two-process CPU (gloo) runs for tests/test_distributed.py; a script, because Lightning's DDP
launcher re-executes the command that started it once per extra rank.

    python tests/distributed_train.py ddp OUT         # Lightning Trainer, DDPStrategy, 2 processes
    python tests/distributed_train.py fsdp OUT        # FSDP1 wrappers and FSDP2 fully_shard by hand, 2 processes
    python tests/distributed_train.py fsdp2 OUT       # Lightning ModelParallelStrategy (FSDP2), 2 processes
    python tests/distributed_train.py fsdp2_meta OUT  # the same, the model built on the meta device
    python tests/distributed_train.py fsdp2_late OUT  # 1 process: layers built in configure_model (refused)
    python tests/distributed_train.py fsdp2_models OUT  # fully_shard on Llama (tied), GPT-2, a ResNet
    python tests/distributed_train.py fsdp2_resume OUT  # checkpoint under FSDP2, then resume from it
    python tests/distributed_train.py zero3 OUT       # DeepSpeed ZeRO-3 (or zero2) on CPU, 2 processes

``ddp`` writes OUT/probe.json (what each rank saw after backward) and OUT/adapter (saved by the
callback on rank 0). ``fsdp`` writes OUT/fsdp.json and OUT/adapter_<policy> (saved through
``save_adapter_gathered`` from a sharded model). ``fsdp2*`` write OUT/fsdp2.json and OUT/adapter.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_lora import LoRACallback, LoRALinear, inject_lora, lora_parameters
from lightning_lora.distributed import frozen_linear_policy, merge_gathered, save_adapter_gathered
from lightning_lora.io import adapter_tensors

STEPS, GLOBAL_BATCH = 4, 16


class TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        """Rank r takes examples r, r + W, r + 2W, ... in order, so each step's global batch is
        GLOBAL_BATCH consecutive examples whatever the world size W. (Lightning's own
        DistributedSampler always shuffles training data, which would change the batches.)"""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = dataset()
        mine = Subset(data, range(rank, len(data), world))
        return DataLoader(mine, batch_size=GLOBAL_BATCH // world, shuffle=False)

    def configure_optimizers(self):
        # SGD: the update is linear in the gradient, so gradient rounding stays at rounding size
        return torch.optim.SGD(self.parameters(), lr=0.5)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(STEPS * GLOBAL_BATCH, 8, generator=g), torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)
    )


class Reseed(L.Callback):
    """Listed before LoRACallback, so A is drawn from the same RNG state in every run."""

    def setup(self, trainer, pl_module, stage) -> None:
        torch.manual_seed(1)


class Probe(L.Callback):
    """After the first backward: which gradients exist, and are the LoRA ones equal on all ranks?"""

    def __init__(self) -> None:
        self.seen: dict | None = None

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.seen is not None:
            return
        frozen = [n for n, p in pl_module.named_parameters() if not p.requires_grad]
        lora = lora_parameters(pl_module)
        flat = torch.cat([p.grad.flatten() for p in lora])
        gathered = trainer.strategy.all_gather(flat)
        ddp = trainer.strategy.model
        registered = ddp._build_params_for_reducer()[0] if hasattr(ddp, "_build_params_for_reducer") else []
        lora_ids = {id(p) for p in lora}
        self.seen = {
            "world_size": trainer.world_size,
            "wrapper": type(ddp).__name__,
            "find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
            "frozen_with_grad": [
                n for n, p in pl_module.named_parameters() if not p.requires_grad and p.grad is not None
            ],
            "n_frozen": len(frozen),
            "lora_grads_identical_across_ranks": bool(all(torch.equal(g, gathered[0]) for g in gathered)),
            "lora_grad_norm": flat.norm().item(),
            "n_registered": len(registered),
            "n_registered_lora": sum(id(p) in lora_ids for p in registered),
            "n_lora": len(lora),
        }


def fit(devices: int, out: Path) -> Probe:
    """Train TinyClassifier with LoRA for STEPS steps of GLOBAL_BATCH examples in all."""
    module = TinyClassifier()
    probe = Probe()
    lora = LoRACallback(
        r=4, alpha=8, target_modules="all-linear", adapter_dir=str(out / "adapter"), merge_on_fit_end=False
    )
    strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo") if devices > 1 else "auto"
    trainer = _trainer(devices, strategy, out, [Reseed(), lora, probe])
    trainer.fit(module)
    if trainer.is_global_zero and devices > 1:
        (out / "probe.json").write_text(json.dumps(probe.seen))
    return probe


def _trainer(
    devices: int, strategy: Any, out: Path, callbacks: list[L.Callback], checkpoints: bool = False
) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(out),
        use_distributed_sampler=False,
    )


# ------------------------------------------------------------------------------- FSDP2 (Lightning)


class ShardedClassifier(TinyClassifier):
    """TinyClassifier sharded as ModelParallelStrategy expects: ``fully_shard`` per layer, then the
    root, in ``configure_model`` (LoRA is already injected when it runs)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class ShardProbe(L.Callback):
    """What FSDP2 trains: at fit start (after meta-device materialisation) the adapters' initial
    values; after the first backward which parameters are DTensors, which have gradients, and
    which the optimizer holds."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning_lora.dtensors import whole

        layers = [m for m in pl_module.modules() if isinstance(m, LoRALinear)]
        self.seen["initial_B_zero"] = all(bool((whole(m.lora_B["default"]) == 0).all()) for m in layers)
        self.seen["initial_A_in_kaiming_bound"] = all(
            bool(whole(m.lora_A["default"]).abs().max() <= m.d_in**-0.5) and bool(whole(m.lora_A["default"]).std() > 0)
            for m in layers
        )
        self.seen["meta_left"] = any(p.is_meta for p in pl_module.parameters())

    def on_after_backward(self, trainer, pl_module) -> None:
        if "frozen_with_grad" in self.seen:
            return
        params = dict(pl_module.named_parameters())
        lora = {id(p) for p in lora_parameters(pl_module)}
        held = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.seen |= {
            "world_size": trainer.world_size,
            "all_dtensors": all(type(p).__name__ == "DTensor" for p in params.values()),
            "frozen_with_grad": [n for n, p in params.items() if not p.requires_grad and p.grad is not None],
            "n_frozen": sum(not p.requires_grad for p in params.values()),
            "lora_with_grad": sum(p.grad is not None for p in params.values() if id(p) in lora),
            "n_lora": len(lora),
            "optimizer_holds_lora_only": {id(p) for p in held} == lora,
        }


class BuiltLate(ShardedClassifier):
    """Builds its layers in configure_model, where FSDP2 users often build them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential()

    def configure_model(self) -> None:
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        super().configure_model()


def fit_late(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    lora = LoRACallback(r=4, target_modules="all-linear", adapter_dir=str(out / "adapter"))
    trainer = _trainer(1, ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), out, [lora])
    try:
        trainer.fit(BuiltLate())
        refusal = None
    except Exception as err:  # the test reads the type and the message
        refusal = f"{type(err).__name__}: {err}"
    (out / "fsdp2.json").write_text(json.dumps({"refusal": refusal, "saved": (out / "adapter").exists()}))


# ------------------------------------------------------------------------------- DeepSpeed


def cpu_deepspeed(stage: int) -> L.pytorch.strategies.Strategy:
    """Lightning's DeepSpeedStrategy, allowed onto CPU processes (gloo) for this test only.

    Lightning 2.6 refuses any accelerator but CUDA in ``setup_environment`` and takes the CUDA
    device index as DeepSpeed's ``device_rank``; these three overrides lift exactly that, and
    everything LoRA meets (``deepspeed.initialize``, ZeRO-3 partitioning, the engine, its
    optimizer) is DeepSpeed's own code."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class CPUDeepSpeed(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", self.local_rank)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return CPUDeepSpeed(stage=stage, exclude_frozen_parameters=True, process_group_backend="gloo")


class DeepSpeedProbe(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.seen:
            return
        params = dict(pl_module.named_parameters())
        engine_optimizer = trainer.strategy.model.optimizer
        held = {id(p) for group in engine_optimizer.param_groups for p in group["params"]}
        self.seen = {
            "engine": type(trainer.strategy.model).__name__,
            "partitioned": all(hasattr(p, "ds_id") for p in params.values()),  # ZeRO-3 marks each
            "optimizer_holds_frozen": any(id(p) in held for p in params.values() if not p.requires_grad),
        }


def fit_deepspeed(out: Path, stage: int) -> None:
    probe = DeepSpeedProbe()
    lora = LoRACallback(r=4, alpha=8, target_modules="all-linear", adapter_dir=str(out / "adapter"), report_merge=False)
    trainer = _trainer(2, cpu_deepspeed(stage), out, [Reseed(), lora, probe])
    module = TinyClassifier()
    trainer.fit(module)
    x = dataset().tensors[0][:5]
    with torch.no_grad():
        merged = trainer.strategy.model(x) if stage == 3 else module.net(x)  # ZeRO-3: through the engine
    if trainer.is_global_zero:
        probe.seen |= {"x": x.tolist(), "merged": merged.tolist()}
        (out / "deepspeed.json").write_text(json.dumps(probe.seen))


def fit_fsdp2_resume(out: Path) -> None:
    """Two fits under ModelParallelStrategy: the first writes a (distributed) checkpoint at its last
    step and saves the adapter; the second resumes from that checkpoint with nothing left to
    train, so the adapter it saves is what the checkpoint restored."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    def run(adapter: str, callbacks: list[L.Callback], ckpt_path: str | None) -> None:
        lora = LoRACallback(r=4, target_modules="all-linear", adapter_dir=str(out / adapter), merge_on_fit_end=False)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = _trainer(2, strategy, out, [Reseed(), lora, *callbacks], checkpoints=bool(callbacks))
        trainer.fit(ShardedClassifier(), ckpt_path=ckpt_path)

    run("trained", [ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_epochs=1)], None)
    run("restored", [], str(next((out / "ckpt").iterdir())))


def fit_fsdp2(out: Path, meta: bool) -> None:
    """Two processes, ModelParallelStrategy (FSDP2): the callback injects, saves and merges."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    probe = ShardProbe()
    lora = LoRACallback(r=4, alpha=8, target_modules="all-linear", adapter_dir=str(out / "adapter"), report_merge=False)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = _trainer(2, strategy, out, [Reseed(), lora, probe])
    with trainer.init_module(empty_init=meta):
        module = ShardedClassifier()
    trainer.fit(module)
    x = dataset().tensors[0][:5]
    with torch.no_grad():
        merged = module.net(x)  # every rank: the forward all-gathers
    if trainer.is_global_zero:
        probe.seen |= {"x": x.tolist(), "merged": merged.tolist()}
        (out / "fsdp2.json").write_text(json.dumps(probe.seen))


# ------------------------------------------------------------------------------- FSDP


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _fsdp_round(rank: int, out: Path, policy_name: str) -> dict:
    """Inject, wrap with FSDP, take one backward, then gather-save, forward, merge, forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    net = Net()
    torch.manual_seed(2)
    inject_lora(net, r=2, alpha=4, target_modules="all-linear", init="gaussian")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = net(x)
    names_before = sorted(adapter_tensors(net))
    if policy_name == "fully_shard":  # FSDP2, functional API: per block, then the root
        from torch.distributed.fsdp import fully_shard

        for block in net.blocks:
            fully_shard(block)
        root = fully_shard(net)
    else:
        policy = ModuleWrapPolicy({Block}) if policy_name == "blocks" else frozen_linear_policy({Block})
        root = FSDP(net, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    root(x).sum().backward()  # a training step's worth of sharded state
    frozen_with_grad = [n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None]
    try:  # a second adapter injected after sharding would be neither sharded nor reduced
        LoRACallback(r=2, adapter_name="late").inject(net)
        refusal = None
    except Exception as err:  # the test reads the type and the message
        refusal = f"{type(err).__name__}: {err}"
    mixed = 0  # units whose one flat parameter holds adapters and frozen weight matrices
    for unit in root.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FSDP) else None
        if handle is not None and handle.flat_param is not None:
            flat = handle.flat_param
            frozen_matrix = any(
                len(s) > 1 and not p.requires_grad for p, s in zip(flat._params, flat._shapes, strict=True)
            )
            mixed += bool(frozen_matrix and any(p.requires_grad for p in flat._params))
    shard_dims = sorted({p.to_local().dim() if hasattr(p, "to_local") else p.dim() for p in lora_parameters(net)})
    dtensors = all(type(p).__name__ == "DTensor" for p in net.parameters())
    save_adapter_gathered(root, net, out / f"adapter_{policy_name}", is_global_zero=rank == 0)
    with torch.no_grad():
        sharded = root(x)
    unloaded = merge_gathered(root, net)
    with torch.no_grad():
        merged = root(x)
    return {
        "before": before.tolist(),
        "sharded": sharded.tolist(),
        "merged": merged.tolist(),
        "unloaded": unloaded,
        "shard_dims": shard_dims,
        "names_before": names_before,
        "x": x.tolist(),
        "units_mixing_frozen_weights_and_adapters": int(mixed),
        "frozen_with_grad": frozen_with_grad,
        "dtensors": dtensors,
        "late_injection": refusal,
    }


# ------------------------------------------------- FSDP2 on real architectures (functional API)

REAL_MODELS = ("llama_tied", "gpt2", "resnet")


def real_model(name: str) -> tuple[nn.Module, list[nn.Module], dict[str, Any], Any]:
    """(model, blocks to shard, inject_lora keywords, its input) for each architecture, built
    from its config with seed 0, as the one-process check in the test builds it again."""
    from tests import hf_models

    if name == "llama_tied":
        model = hf_models.llama(tied=True)
        return model, list(model.model.layers), {"target_modules": "all-linear"}, hf_models.ids()
    if name == "gpt2":  # transformers' Conv1D
        model = hf_models.gpt2()
        return model, list(model.transformer.h), {"target_modules": "all-linear"}, hf_models.ids()
    model = hf_models.resnet()  # convolutions
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, list(model.resnet.encoder.stages), {"target_modules": ["convolution"]}, pixels


def model_output(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits if x.dtype == torch.long else model(pixel_values=x).logits


def _fsdp2_real_round(rank: int, out: Path, name: str) -> dict:
    """Inject, train-like adapters, shard by hand, one backward, gather-save, merge."""
    from torch.distributed.fsdp import fully_shard

    from tests.hf_models import as_if_trained

    model, blocks, fields, x = real_model(name)
    inject_lora(model, r=4, alpha=8, **fields)
    as_if_trained(model)
    before = model_output(model, x)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # a backward in eval mode: gradients flow, and BatchNorm keeps its running statistics
    (model(x).logits if x.dtype == torch.long else model(pixel_values=x).logits).float().pow(2).mean().backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    all_dtensors = all(type(p).__name__ == "DTensor" for p in model.parameters())  # resharded after backward
    lora_without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    save_adapter_gathered(model, model, out / name, is_global_zero=rank == 0)
    without_grad_after_save = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    sharded = model_output(model, x)
    merge_gathered(model, model)
    merged = model_output(model, x)
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.get_input_embeddings().weight
    return {
        "before": before.tolist(),
        "sharded": sharded.tolist(),
        "merged": merged.tolist(),
        "frozen_with_grad": frozen_with_grad,
        "all_dtensors": all_dtensors,
        "lora_without_grad": lora_without_grad,
        "lora_without_grad_after_save": without_grad_after_save,
        "tied_after_merge": tied,
    }


def fsdp2_models_worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    report = {name: _fsdp2_real_round(rank, Path(out), name) for name in REAL_MODELS}
    if rank == 0:
        (Path(out) / "fsdp2_models.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    os._exit(0)


def fsdp_worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    report = {policy: _fsdp_round(rank, Path(out), policy) for policy in ("blocks", "split", "fully_shard")}
    if rank == 0:
        (Path(out) / "fsdp.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it after the run is done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "ddp":
        fit(devices=2, out=out_dir)
    elif mode == "fsdp":
        torch.multiprocessing.spawn(fsdp_worker, args=(str(out_dir), free_port()), nprocs=2)
    elif mode in ("fsdp2", "fsdp2_meta"):
        fit_fsdp2(out_dir, meta=mode == "fsdp2_meta")
    elif mode == "fsdp2_late":
        fit_late(out_dir)
    elif mode == "fsdp2_models":
        torch.multiprocessing.spawn(fsdp2_models_worker, args=(str(out_dir), free_port()), nprocs=2)
    elif mode == "fsdp2_resume":
        fit_fsdp2_resume(out_dir)
    elif mode in ("zero2", "zero3"):
        fit_deepspeed(out_dir, stage=int(mode[-1]))
    else:
        raise SystemExit(
            f"unknown mode {mode!r}; use ddp, fsdp, fsdp2, fsdp2_meta, fsdp2_late, fsdp2_resume, fsdp2_models, zero2 or zero3"
        )
    if torch.distributed.is_initialized():
        # Lightning leaves its process group up. Without this, a process sometimes aborted at
        # interpreter exit ("terminate called without an active exception") after all its work
        # was done: 1-2 runs in 10 of fsdp2_meta on 2 CPU cores. Both ranks finish together, then
        # the group is taken down before Python tears down the threads under it.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
