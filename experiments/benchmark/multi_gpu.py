"""LoRA on two GPUs through Lightning's own strategies: DDP vs FSDP, same model, same per-GPU batch.

One strategy per invocation (Lightning's launcher re-executes this command for rank 1)::

    for s in ddp fsdp fsdp-split; do
        python experiments/benchmark/multi_gpu.py --strategy $s --out $OUT
    done

* ``ddp``: ``DDPStrategy(find_unused_parameters=False)``; only the adapters are in DDP's reducer.
* ``fsdp``: ``FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})``, FULL_SHARD, the policy a
  user writes first. Frozen weights and adapters share each layer's flat parameter.
* ``fsdp-split``: ``FSDPStrategy(auto_wrap_policy=frozen_linear_policy({LlamaDecoderLayer}))``:
  frozen Linears are units of their own, so no flat parameter mixes frozen weights and adapters
  (see ``lightning_lora.distributed`` for why that mixing costs).
* ``deepspeed3``: ``DeepSpeedStrategy(stage=3, exclude_frozen_parameters=True)`` (ZeRO-3: every
  parameter partitioned; the adapter gathered with DeepSpeed's ``GatheredParameters``).
* ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``; the module's
  ``configure_model`` applies ``fully_shard`` to each ``LlamaDecoderLayer``, then to the root (the
  callback has injected LoRA before it runs). Every parameter is a DTensor of its own.

``--devices 1`` runs any of them on one GPU (a 1-rank mesh): no communication to speak of, so it
shows what each strategy's bookkeeping and autograd cost, and proves the code path where only
one GPU is lent.

LoRA is injected by ``LoRACallback`` at ``setup``, before the strategy wraps the model. At the
end of ``fit`` the callback saves the adapter through ``save_adapter_gathered`` (full parameters
gathered, bare module names) and merges through ``merge_gathered`` (a thin subclass only probes
the model's outputs before and after). Rank 0
then loads the saved adapter into a fresh single-GPU copy of the model and compares its logits
with the ones the sharded model produced; later strategies also compare their adapter with the
DDP one. Each run appends one record to ``<out>/multi.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_lora import LoRACallback, load_adapter
from lightning_lora.distributed import frozen_linear_policy, is_sharded

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"layers": 16, "hidden": 2048, "intermediate": 5632, "heads": 16, "vocab": 32000, "batch": 8, "seq": 1024}
SMOKE = {"layers": 2, "hidden": 64, "intermediate": 160, "heads": 4, "vocab": 512, "batch": 2, "seq": 32}
EVAL_TOKENS = 256


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=max(shape["seq"], EVAL_TOKENS),
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)  # the same base weights on every rank and in the single-GPU check
    with device:
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def eval_ids(shape: dict, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, shape["vocab"], (1, min(EVAL_TOKENS, shape["seq"])), generator=g).to(device)


class LitLM(L.LightningModule):
    def __init__(self, shape: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.shape = shape
        self.lm = build_model(shape, device, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        hidden = self.lm.model(input_ids=ids).last_hidden_state
        logits = self.lm.lm_head(hidden).float()  # called as a module: FSDP may have wrapped it
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.device.type == "cuda")


class ShardedLM(LitLM):
    """For ``ModelParallelStrategy``: FSDP2, one ``fully_shard`` per decoder layer, then the
    language model as the root. FSDP2 gathers a unit's weights in the hooks of its ``forward``,
    so the training step calls the root's forward (not its submodules, as LitLM's does)."""

    reshard_after_forward = True  # False: keep each layer gathered from forward to backward (ZeRO-2-like)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.lm.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(self.lm, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        logits = self.lm(input_ids=ids).logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

    def configure_optimizers(self):
        # fused AdamW has no DTensor kernel on every torch; foreach is the FSDP2 default
        return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=True)


class RankBatches(Dataset):
    """Every step the same batch on a rank, a different one on each rank (seeded by rank)."""

    def __init__(self, shape: dict, rank: int, length: int) -> None:
        g = torch.Generator().manual_seed(1000 + rank)
        self.ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        self.labels = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.ids, self.labels


class Reseed(L.Callback):
    """Before LoRACallback: A is drawn from one RNG state in every run, so runs compare."""

    def setup(self, trainer, pl_module, stage) -> None:
        torch.manual_seed(1)


class StepTimer(L.Callback):
    """CUDA events at step starts after warm-up; peak memory over the timed steps; per rank."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.marks: list = []
        self.peak_gib = 0.0
        self.all_medians: list[float] = []
        self.all_peaks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        cuda = pl_module.device.type == "cuda"
        if batch_idx == self.warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if batch_idx >= self.warmup:
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append(event)
            else:
                self.marks.append(time.perf_counter())
        if batch_idx == self.warmup + self.steps and cuda:
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        else:
            times = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        self.times = times[: self.steps]
        mine = torch.tensor([statistics.median(self.times), self.peak_gib], device=pl_module.device)
        gathered = trainer.strategy.all_gather(mine).reshape(-1, 2).cpu()
        self.all_medians = gathered[:, 0].tolist()
        self.all_peaks = gathered[:, 1].tolist()


class ProbingLoRACallback(LoRACallback):
    """The shipped LoRACallback (its fit end gathers the adapter, rank 0 writes it, every rank
    merges into its shards), plus, for the check, the eval batch through the strategy's model
    before saving and after merging."""

    def __init__(self, probe_ids: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.probe_ids = probe_ids
        self.probes: dict[str, torch.Tensor] = {}

    def _probe(self, trainer, pl_module, key: str) -> None:
        root = trainer.strategy.model
        # FSDP: through the root, which gathers each unit's parameters as in training. DDP:
        # Lightning calls on_fit_end after the strategy's teardown moved the model to the CPU,
        # so back to this rank's GPU for the check.
        if type(trainer.strategy).__name__ in ("DDPStrategy", "DeepSpeedStrategy"):
            pl_module.to(trainer.strategy.root_device)  # DeepSpeed's teardown moved the buffers too
        model = root if is_sharded(root) else pl_module
        with torch.no_grad():
            self.probes[key] = model(self.probe_ids.to(trainer.strategy.root_device)).float().cpu()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._probe(trainer, pl_module, "sharded")
        super().on_fit_end(trainer, pl_module)
        if self.merge_on_fit_end:
            self._probe(trainer, pl_module, "merged")


def make_strategy(name: str, cuda: bool, devices: int, batch: int):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if name == "ddp":
        return DDPStrategy(find_unused_parameters=False, process_group_backend=None if cuda else "gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if name == "deepspeed3":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # the loader yields whole batches (batch_size=None): DeepSpeed is told the micro-batch
        return DeepSpeedStrategy(stage=3, exclude_frozen_parameters=True, logging_batch_size_per_gpu=batch)
    policy = {LlamaDecoderLayer} if name == "fsdp" else frozen_linear_policy({LlamaDecoderLayer})
    return FSDPStrategy(auto_wrap_policy=policy, sharding_strategy="FULL_SHARD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "fsdp-split", "fsdp2", "deepspeed3"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--no-reshard", action="store_true", help="fsdp2: reshard_after_forward=False")
    parser.add_argument("--precision", default="bf16-true", help="32-true: checks that strategies agree to rounding")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lora_multi_gpu", help="adapters of each strategy (not returned)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU: ddp and fsdp2)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    shape = SMOKE if args.smoke else FULL
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    adapter_dir = Path(args.work) / args.strategy
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    module = (ShardedLM if args.strategy == "fsdp2" else LitLM)(shape, device, dtype)
    if args.no_reshard:
        module.reshard_after_forward = False
    timer = StepTimer(args.warmup, args.steps)
    lora = ProbingLoRACallback(
        eval_ids(shape, device), r=16, alpha=32, target_modules=TARGETS, adapter_dir=str(adapter_dir)
    )
    total = args.warmup + args.steps + 1
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=args.devices,
        strategy=make_strategy(args.strategy, cuda, args.devices, shape["batch"]),
        precision=args.precision,
        max_steps=total,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[Reseed(), lora, timer],
        default_root_dir=args.work,
    )
    rank = int(os.environ.get("RANK", local_rank))
    train = DataLoader(RankBatches(shape, rank, total), batch_size=None, pin_memory=cuda)
    t0 = time.monotonic()
    trainer.fit(module, train)
    fit_s = time.monotonic() - t0
    sharded_logits, merged_logits = lora.probes["sharded"], lora.probes["merged"]
    if not trainer.is_global_zero:
        return
    # rank 0: the saved adapter on one GPU, from a fresh model
    fresh = LitLM(shape, device, dtype).eval()  # the adapter's names start at the LightningModule ("lm.")
    load_adapter(fresh, adapter_dir)
    with torch.no_grad():
        single = fresh(eval_ids(shape, device)).float().cpu()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    notes = {
        "adapter_on_one_gpu_vs_sharded_logits_max_abs": (single - sharded_logits).abs().max().item(),
        "adapter_on_one_gpu_vs_sharded_logits_rel": rel(single, sharded_logits),
        "merged_vs_unmerged_logits_rel": rel(merged_logits, sharded_logits),
    }
    ddp_dir = Path(args.work) / "ddp"
    if args.strategy != "ddp" and (ddp_dir / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        mine, ddp = (
            load_file(adapter_dir / "adapter_model.safetensors"),
            load_file(ddp_dir / "adapter_model.safetensors"),
        )
        notes["adapter_vs_ddp_adapter_rel_max"] = max(rel(mine[k].float(), ddp[k].float()) for k in ddp)
    record = {
        "group": "multi",
        "config": f"LoRA + {args.strategy}"
        + (" (no reshard)" if args.no_reshard else "")
        + (f" ({args.precision})" if args.precision != "bf16-true" else ""),
        "device": f"{args.devices}× {torch.cuda.get_device_name()}" if cuda else f"{args.devices}× cpu",
        "per_gpu_batch": f"{shape['batch']}×{shape['seq']}",
        "times": timer.times,
        "median_s": statistics.median(timer.times),
        "medians_s": timer.all_medians,
        "peaks_gib": timer.all_peaks,
        "fit_s": fit_s,
        "notes": ", ".join(f"{k} {v:.2e}" for k, v in notes.items()),
        **notes,
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "multi.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("RECORD", json.dumps({k: v for k, v in record.items() if k != "times"}), flush=True)


if __name__ == "__main__":
    main()
