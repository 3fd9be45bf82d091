"""Speed and memory of LoRA training on a Llama-shaped model: ours vs PEFT vs the frozen-base floor.

Every configuration runs in this one process, on the same model shape and the same batch, one
after the other, with everything freed in between; each record goes to ``records.jsonl`` as soon
as it is measured, and ``report.py`` turns the records into ``RESULTS.md`` at the end (also when
the time budget cut the run short).

On the GPU machine (one H100)::

    python experiments/benchmark/gpu_benchmark.py --out $OUT

A smoke run of every code path on this CPU (tiny model, a few steps)::

    python experiments/benchmark/gpu_benchmark.py --smoke --out /tmp/bench

What is timed: a training step is ``model.model(ids)`` → ``lm_head`` → fp32 cross-entropy →
``backward`` → fused AdamW ``step`` + ``zero_grad`` (no optimizer for the floor). The step time is
the median over ``--steps`` steps after ``--warmup`` steps, measured with CUDA events between the
starts of consecutive steps, so launch gaps count. "Compiled" compiles each decoder layer in place
(``layer.compile()``: one graph reused by all 16 layers) and the loss head; the same for every
configuration. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights,
optimizer state and activations), reset before them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for lightning_lora
sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py & co. beside this file

from layer_micro import run_layer_micro
from profiling import profile_kernels
from report import write_results

from lightning_lora import inject_lora, lora_parameters, merge_lora, unload_lora, unmerge_lora
from lightning_lora.fused import fast_path
from lightning_lora.kernels import triton_kernels
from lightning_lora.shared_inputs import sharing_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32


@dataclass(frozen=True)
class Shape:
    layers: int = 16
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 16
    vocab: int = 32000
    batch: int = 8
    seq: int = 1024
    kv_heads: int | None = None  # grouped-query attention; None: as many as ``heads``
    name: str = "953M"


SMOKE = Shape(layers=2, hidden=64, intermediate=160, heads=4, vocab=512, batch=2, seq=32)
# The regime most users train in: four decoder layers of Llama-3-8B (hidden 4096, intermediate
# 14336, grouped-query attention 32/8, vocab 128256), same batch. The layers have 8B's shapes;
# there are only four of them, so each configuration builds and runs in seconds.
LLAMA3_8B_LAYERS = Shape(
    layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, name="8B-layers"
)
SMOKE_8B = Shape(
    layers=2, hidden=128, intermediate=448, heads=8, kv_heads=2, vocab=1024, batch=2, seq=32, name="8B-layers"
)


# ----------------------------------------------------------------------------------- plumbing


class Bench:
    """Device, batch, timing and the records file of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shape = SMOKE if args.smoke else Shape()
        self.shape_8b = SMOKE_8B if args.smoke else LLAMA3_8B_LAYERS
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records_file = self.out / "records.jsonl"
        self.started = time.monotonic()
        self._use(self.shape)

    def _use(self, shape: Shape) -> None:
        """Make ``shape`` the model and batch every run builds (token ids drawn with seed 0)."""
        self.shape = shape
        g = torch.Generator().manual_seed(0)
        self.ids_cpu = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g)
        self.labels_cpu = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g)
        self.ids = self.ids_cpu.to(self.device)
        self.labels = self.labels_cpu.to(self.device)

    @contextlib.contextmanager
    def using(self, shape: Shape):
        """Run a block on another model shape (the 8B-class rows), then restore the default."""
        before = self.shape
        self._use(shape)
        try:
            yield
        finally:
            self._use(before)

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()

    def time_steps(self, step: Callable[[], object], warmup: int, steps: int) -> tuple[list[float], float | None]:
        """Per-step seconds between consecutive step starts, and the peak memory while timing."""
        for _ in range(warmup):
            step()
        self.sync()
        self.reset_peak()
        if self.cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            for i in range(steps):
                marks[i].record()
                step()
            marks[-1].record()
            self.sync()
            times = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(steps)]
        else:
            stamps = []
            for _ in range(steps):
                stamps.append(time.perf_counter())
                step()
            stamps.append(time.perf_counter())
            times = [b - a for a, b in itertools.pairwise(stamps)]
        return times, self.peak_gib()

    def record(self, **fields: object) -> dict:
        fields.setdefault("error", None)
        if fields.get("times"):
            times = sorted(fields["times"])
            fields["median_s"] = statistics.median(times)
            fields["q1_s"] = times[len(times) // 4]
            fields["q3_s"] = times[(3 * len(times)) // 4]
        with open(self.records_file, "a") as f:
            f.write(json.dumps(fields) + "\n")
        shown = {k: v for k, v in fields.items() if k not in ("times", "profile")}
        print("RECORD", json.dumps(shown), flush=True)
        return fields


def build_model(bench: Bench, device: torch.device | None = None):
    """The Llama-shaped model with random weights (seed 0), bf16, on the device (or ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = bench.shape
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads or s.heads,
        max_position_embeddings=s.seq,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with device or bench.device:
        model = LlamaForCausalLM(config)
    return model.to(bench.dtype)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits, then cross-entropy in fp32 (as transformers computes it)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def compile_model(causal_lm, backend: str, mode: str | None = None) -> Callable:
    """Compile each decoder layer in place (module names unchanged) and return a compiled loss.
    ``mode="reduce-overhead"`` adds CUDA graphs to the layers (a diagnostic: it removes launch
    overhead, so what remains of a gap is device work)."""
    for layer in causal_lm.model.layers:
        layer.compile(backend=backend, mode=mode)
    return torch.compile(head_loss, backend=backend)


def make_trainable(setup: str, model):
    """Freeze/adapt ``model`` for ``setup``; returns (model to run, trainable parameters, the
    PeftModel for PEFT setups or None)."""
    if setup == "floor":
        model.requires_grad_(False)
        # input gradients on: backward runs through every layer, as it must under any adapter
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model, [], None
    if setup == "full":
        model.requires_grad_(True)
        return model, list(model.parameters()), None
    if setup in ("ours", "ours-fp32", "ours-dora", "ours-fa"):
        dtype = "float32" if setup == "ours-fp32" else None
        variant = {"ours-dora": {"use_dora": True}, "ours-fa": {"freeze_a": True}}.get(setup, {})
        inject_lora(model, r=R, alpha=ALPHA, target_modules=TARGETS, adapter_dtype=dtype, **variant)
        return model, [p for p in model.parameters() if p.requires_grad], None
    if setup in ("peft-default", "peft-bf16", "peft-dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, use_dora=setup == "peft-dora"
        )
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=setup == "peft-default")
        return peft_model.get_base_model(), [p for p in peft_model.parameters() if p.requires_grad], peft_model
    raise ValueError(setup)


def optimizer_for(bench: Bench, params: list) -> torch.optim.Optimizer | None:
    if not params:
        return None
    return torch.optim.AdamW(params, lr=1e-4, fused=bench.cuda)


# ----------------------------------------------------------------------------------- training


def run_functional(
    bench: Bench,
    name: str,
    setup: str,
    compiled: bool,
    mode: str,
    profile: bool,
    graphs: bool = False,
    group: str = "train",
    autocast: bool = False,
    sharing: bool = False,
    kernel_mode: str = "never",
) -> None:
    """One configuration's steps; ``autocast``: each forward under ``torch.autocast`` in bf16
    (what Lightning's ``precision="bf16-mixed"`` does), here over the bf16 model; ``sharing``:
    sibling layers share ``x Aᵀ`` (:mod:`lightning_lora.shared_inputs`, off by default);
    ``kernel_mode``: the fast path's Triton kernels, ``never`` (default) / ``auto`` / ``always``
    (:mod:`lightning_lora.kernels`)."""
    model = build_model(bench)
    causal_lm, params, _ = make_trainable(setup, model)
    optimizer = optimizer_for(bench, params)
    loss_fn = head_loss
    compile_s = None
    counters = torch._dynamo.utils.counters
    counters.clear()
    if compiled:
        loss_fn = compile_model(causal_lm, bench.args.backend, "reduce-overhead" if graphs else None)

    def step() -> None:
        with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = causal_lm.model(input_ids=bench.ids).last_hidden_state
            loss = loss_fn(hidden, causal_lm.lm_head.weight, bench.labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with fast_path(mode), sharing_inputs(sharing), triton_kernels(kernel_mode):
        if compiled:
            t0 = time.monotonic()
            step()
            bench.sync()
            compile_s = time.monotonic() - t0
        times, peak = bench.time_steps(step, bench.args.warmup, bench.args.steps)
        prof = profile_kernels(bench, step) if profile else None
    breaks = sum(counters["graph_break"].values()) if compiled else None
    bench.record(
        group=group,
        config=name,
        setup=setup,
        shape=bench.shape.name,
        via="functional" + (", bf16 autocast" if autocast else ""),
        compiled=compiled,
        cuda_graphs=graphs,
        fast_path=mode,
        input_sharing=sharing,
        triton_kernels=kernel_mode,
        times=times,
        peak_gib=peak,
        trainable=sum(p.numel() for p in params),
        compile_s=compile_s,
        graph_breaks=breaks,
        profile=prof,
    )


def run_callback(bench: Bench, name: str, compiled: bool, precision: str | None = None, group: str = "train") -> None:
    """Ours through LoRACallback in a real Lightning Trainer (injection at setup, the module's
    optimizer stripped to the adapters at fit start), timed by a callback with CUDA events."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_lora import LoRACallback

    class LitLM(L.LightningModule):
        def __init__(self, causal_lm, loss_fn) -> None:
            super().__init__()
            self.lm, self.loss_fn = causal_lm, loss_fn

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            hidden = self.lm.model(input_ids=ids).last_hidden_state
            return self.loss_fn(hidden, self.lm.lm_head.weight, labels)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=bench.cuda)

    class SameBatch(Dataset):
        def __len__(self) -> int:
            return bench.args.warmup + bench.args.steps + 1

        def __getitem__(self, i: int):
            return bench.ids, bench.labels  # on the GPU already, as in the functional runs

    class StepTimer(L.Callback):
        """Events at the start of each step from ``warmup`` on; the last start only closes
        the last interval (its step runs untimed). Peak memory over the timed steps."""

        def __init__(self) -> None:
            self.marks: list = []
            self.peak = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == bench.args.warmup:
                bench.sync()
                bench.reset_peak()
            if batch_idx >= bench.args.warmup:
                if bench.cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    self.marks.append(event)
                else:
                    self.marks.append(time.perf_counter())
            if batch_idx == bench.args.warmup + bench.args.steps:
                bench.sync()
                self.peak = bench.peak_gib()

        def times(self) -> list[float]:
            if bench.cuda:
                bench.sync()
                return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
            return [b - a for a, b in itertools.pairwise(self.marks)]

    model = build_model(bench)
    loss_fn = compile_model(model, bench.args.backend) if compiled else head_loss
    module = LitLM(model, loss_fn)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        lora = LoRACallback(
            r=R, alpha=ALPHA, target_modules=TARGETS, adapter_dir=f"{tmp}/adapter", merge_on_fit_end=False
        )
        trainer = L.Trainer(
            accelerator="gpu" if bench.cuda else "cpu",
            devices=1,
            max_steps=bench.args.warmup + bench.args.steps + 1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[lora, timer],
            default_root_dir=tmp,
            **({"precision": precision} if precision else {}),
        )
        loader = DataLoader(SameBatch(), batch_size=None)
        trainer.fit(module, loader)
    bench.record(
        group=group,
        config=name,
        setup="ours",
        via="callback" + (f", precision={precision}" if precision else ""),
        compiled=compiled,
        fast_path="auto",
        times=timer.times(),
        peak_gib=timer.peak,
        trainable=sum(p.numel() for p in lora_parameters(module)),
    )


# ----------------------------------------------------------------------------------- inference


def time_forward(bench: Bench, causal_lm, reps: int) -> tuple[list[float], float | None]:
    def forward() -> None:
        hidden = causal_lm.model(input_ids=bench.ids).last_hidden_state
        causal_lm.lm_head(hidden)

    with torch.inference_mode():
        return bench.time_steps(forward, warmup=3, steps=reps)


def logits(bench: Bench, causal_lm) -> torch.Tensor:
    with torch.inference_mode():
        return causal_lm(input_ids=bench.ids[:1]).logits.float()


def timed(bench: Bench, fn: Callable[[], object]) -> tuple[float, object]:
    bench.sync()
    t0 = time.perf_counter()
    out = fn()
    bench.sync()
    return time.perf_counter() - t0, out


def run_inference(bench: Bench) -> None:
    """Unmerged vs merged forward (8×1024 tokens, logits, no loss) and the time to merge the
    whole model: ours (merge_lora, fp32, NaN check) vs PEFT merge_and_unload(safe_merge=True)."""
    reps = bench.args.steps
    # ours: trained-looking adapters (B random: zeros can run faster than real data)
    model = build_model(bench).eval()
    inject_lora(model, r=R, alpha=ALPHA, target_modules=TARGETS)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] == R:  # B: (d_out, r)
                p.normal_(0, 0.02)
    reference_logits = logits(bench, model)
    times, peak = time_forward(bench, model, reps)
    bench.record(group="infer", config="ours unmerged", times=times, peak_gib=peak)
    with fast_path("never"):
        times, peak = time_forward(bench, model, reps)
    bench.record(group="infer", config="ours unmerged, reference path", times=times, peak_gib=peak)
    merges = []
    for _ in range(4):
        seconds, _ = timed(bench, lambda model=model: merge_lora(model))
        merges.append(seconds)
        if len(merges) < 4:
            unmerge_lora(model)
    merged_logits = logits(bench, model)
    rel = ((merged_logits - reference_logits).norm() / reference_logits.norm()).item()
    bench.record(
        group="merge", config="ours merge_lora (safe)", first_s=merges[0], times=merges[1:], rel_diff_logits=rel
    )
    times, peak = time_forward(bench, model, reps)
    bench.record(group="infer", config="ours merged (LoRA layers kept)", times=times, peak_gib=peak)
    unload_lora(model, merge=True)
    times, peak = time_forward(bench, model, reps)
    bench.record(group="infer", config="merged (plain model, after unload_lora)", times=times, peak_gib=peak)
    del model
    bench.free()

    for setup in ("peft-bf16", "peft-default"):
        base = build_model(bench).eval()
        causal_lm, params, peft_model = make_trainable(setup, base)
        with torch.no_grad():
            for name, p in causal_lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        reference_logits = logits(bench, causal_lm)
        times, peak = time_forward(bench, causal_lm, reps)
        bench.record(group="infer", config=f"{setup} unmerged", times=times, peak_gib=peak)
        if setup == "peft-bf16":
            seconds, merged = timed(bench, lambda pm=peft_model: pm.merge_and_unload(safe_merge=True))
            merged_logits = logits(bench, merged)
            rel = ((merged_logits - reference_logits).norm() / reference_logits.norm()).item()
            bench.record(
                group="merge",
                config="peft merge_and_unload(safe_merge=True)",
                first_s=seconds,
                times=[seconds],
                rel_diff_logits=rel,
            )
            times, peak = time_forward(bench, merged, reps)
            bench.record(group="infer", config="peft-bf16 merged", times=times, peak_gib=peak)
            del merged
        del base, causal_lm, params, peft_model
        bench.free()


# ----------------------------------------------------------------------------------- main


def machine(bench: Bench) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if bench.cuda else platform.processor() or "cpu",
        "shape": asdict(bench.shape),
        "shape_8b": asdict(bench.shape_8b),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for package in ("transformers", "peft", "lightning"):
        with contextlib.suppress(Exception):
            info[package] = __import__(package).__version__
    return info


def plan(bench: Bench) -> list[tuple[str, float, Callable[[], None]]]:
    """(name, rough seconds it needs, run) in priority order: what a cut-short run must keep."""
    import qlora  # beside this file; it imports this module, so only now

    eager = 20 if bench.cuda else 5
    comp = 40 if bench.cuda else 30
    b = bench

    def on_8b(run: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            with b.using(b.shape_8b):
                run()

        return wrapped

    def train_8b(
        name: str, setup: str, compiled: bool, mode: str = "auto", sharing: bool = False, kernel_mode: str = "never"
    ) -> Callable[[], None]:
        return on_8b(
            lambda: run_functional(
                b, f"8B {name}", setup, compiled, mode, False, group="8b", sharing=sharing, kernel_mode=kernel_mode
            )
        )

    def kernels_row(name: str, compiled: bool, kernel_mode: str, mode: str = "auto") -> Callable[[], None]:
        return lambda: run_functional(b, name, "ours", compiled, mode, False, kernel_mode=kernel_mode)

    return [
        ("floor eager", eager, lambda: run_functional(b, "floor eager", "floor", False, "auto", True)),
        ("ours eager", eager, lambda: run_functional(b, "ours eager", "ours", False, "auto", True)),
        ("ours eager triton", eager, kernels_row("ours eager, Triton kernels", False, "always")),
        ("ours eager triton auto", eager, kernels_row("ours eager, Triton kernels where timed faster", False, "auto")),
        ("ours lora-fa eager", eager, lambda: run_functional(b, "ours LoRA-FA eager", "ours-fa", False, "auto", True)),
        ("ours eager shared", eager, lambda: run_functional(b, "ours eager, input sharing", "ours", False, "auto", False, sharing=True)),
        ("ours callback eager", eager + 10, lambda: run_callback(b, "ours callback eager", False)),
        ("peft-default eager", eager, lambda: run_functional(b, "peft-default eager", "peft-default", False, "auto", False)),
        ("peft-bf16 eager", eager, lambda: run_functional(b, "peft-bf16 eager", "peft-bf16", False, "auto", False)),
        ("full eager", eager, lambda: run_functional(b, "full fine-tune eager", "full", False, "auto", False)),
        ("ours eager reference", eager, lambda: run_functional(b, "ours eager, reference path", "ours", False, "never", True)),
        ("ours eager repeat", eager, lambda: run_functional(b, "ours eager (repeat)", "ours", False, "auto", False)),
        ("ours callback eager repeat", eager + 10, lambda: run_callback(b, "ours callback eager (repeat)", False)),
        ("inference", 60 if bench.cuda else 10, lambda: run_inference(b)),
        ("micro", 40 if bench.cuda else 10, lambda: run_layer_micro(b)),
        ("floor compiled", comp, lambda: run_functional(b, "floor compiled", "floor", True, "auto", True)),
        ("ours compiled", comp, lambda: run_functional(b, "ours compiled", "ours", True, "auto", True)),
        ("ours lora-fa compiled", comp, lambda: run_functional(b, "ours LoRA-FA compiled", "ours-fa", True, "auto", False)),
        ("ours callback compiled", comp, lambda: run_callback(b, "ours callback compiled", True)),
        ("ours compiled function", comp, lambda: run_functional(b, "ours compiled, Function forced", "ours", True, "always", False)),
        ("ours compiled function triton", comp, kernels_row("ours compiled, Function + Triton ops", True, "always", "always")),
        ("peft-bf16 compiled", comp, lambda: run_functional(b, "peft-bf16 compiled", "peft-bf16", True, "auto", False)),
        ("floor compiled graphs", comp, lambda: run_functional(b, "floor compiled + CUDA graphs", "floor", True, "auto", False, True)),
        ("ours compiled graphs", comp, lambda: run_functional(b, "ours compiled + CUDA graphs", "ours", True, "auto", False, True)),
        ("8b floor eager", 2 * eager, train_8b("floor eager", "floor", False)),
        ("8b ours eager", 2 * eager, train_8b("ours eager", "ours", False)),
        ("8b ours eager triton", 2 * eager, train_8b("ours eager, Triton kernels", "ours", False, kernel_mode="always")),
        ("8b ours lora-fa eager", 2 * eager, train_8b("ours LoRA-FA eager", "ours-fa", False)),
        ("8b ours eager shared", 2 * eager, train_8b("ours eager, input sharing", "ours", False, sharing=True)),
        ("8b peft-bf16 eager", 2 * eager, train_8b("peft-bf16 eager", "peft-bf16", False)),
        ("8b peft-default eager", 2 * eager, train_8b("peft-default eager", "peft-default", False)),
        ("8b ours eager reference", 2 * eager, train_8b("ours eager, reference path", "ours", False, "never")),
        ("8b micro", 60 if bench.cuda else 10, on_8b(lambda: run_layer_micro(b))),
        ("8b floor compiled", comp, train_8b("floor compiled", "floor", True)),
        ("8b ours compiled", comp, train_8b("ours compiled", "ours", True)),
        ("8b ours lora-fa compiled", comp, train_8b("ours LoRA-FA compiled", "ours-fa", True)),
        ("8b ours compiled function triton", comp, train_8b("ours compiled, Function + Triton ops", "ours", True, "always", kernel_mode="always")),
        ("8b peft-bf16 compiled", comp, train_8b("peft-bf16 compiled", "peft-bf16", True)),
        ("ours-fp32 eager", eager, lambda: run_functional(b, "ours fp32 adapters eager", "ours-fp32", False, "auto", False)),
        ("floor autocast", eager, lambda: run_functional(b, "floor bf16 autocast", "floor", False, "auto", False, group="autocast", autocast=True)),
        ("ours autocast", eager, lambda: run_functional(b, "ours bf16 autocast", "ours", False, "auto", False, group="autocast", autocast=True)),
        ("ours autocast reference", eager, lambda: run_functional(b, "ours bf16 autocast, reference path", "ours", False, "never", False, group="autocast", autocast=True)),
        ("peft-bf16 autocast", eager, lambda: run_functional(b, "peft-bf16 bf16 autocast", "peft-bf16", False, "auto", False, group="autocast", autocast=True)),
        ("ours callback bf16-mixed", eager + 10, lambda: run_callback(b, "ours callback bf16-mixed", False, "bf16-mixed", group="autocast")),
        ("ours dora", eager, lambda: run_functional(b, "ours DoRA eager", "ours-dora", False, "auto", True, group="dora")),
        ("peft dora", eager, lambda: run_functional(b, "peft DoRA eager", "peft-dora", False, "auto", False, group="dora")),
        ("ours lora for dora", eager, lambda: run_functional(b, "ours LoRA eager (beside DoRA)", "ours", False, "auto", True, group="dora")),
        ("peft lora for dora", eager, lambda: run_functional(b, "peft-bf16 LoRA eager (beside DoRA)", "peft-bf16", False, "auto", False, group="dora")),
        ("qlora floor", eager, lambda: qlora.run_qlora(b, "qlora floor", "floor", profile=True)),
        ("qlora ours", eager, lambda: qlora.run_qlora(b, "qlora ours", "ours", profile=True)),
        ("qlora peft", eager, lambda: qlora.run_qlora(b, "qlora peft", "peft")),
        ("qlora peft autocast", eager, lambda: qlora.run_qlora(b, "qlora peft autocast", "peft-autocast")),
        ("qlora ours reference", eager, lambda: qlora.run_qlora(b, "qlora ours, reference path", "ours-reference")),
        ("qlora callback", 60, lambda: qlora.run_qlora_callback(b, "qlora callback")),
        ("qlora floor repeat", eager, lambda: qlora.run_qlora(b, "qlora floor (repeat)", "floor")),
        ("qlora ours repeat", eager, lambda: qlora.run_qlora(b, "qlora ours (repeat)", "ours")),
        ("qlora peft repeat", eager, lambda: qlora.run_qlora(b, "qlora peft (repeat)", "peft")),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lightning_lora_benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: check every code path")
    parser.add_argument("--only", default="", help="comma-separated plan entries to run (default: all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=560.0, help="skip what would not finish in time")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--results", default=None, help="where to write RESULTS.md (default: <out>/RESULTS.md)")
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.smoke else 25)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    bench = Bench(args)
    info = machine(bench)
    (bench.out / "machine.json").write_text(json.dumps(info, indent=2))
    print("MACHINE", json.dumps(info), flush=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, cost, run in plan(bench):
        if only and name not in only:
            continue
        if bench.left_s() < cost:
            bench.record(group="skipped", config=name, error=f"skipped: {bench.left_s():.0f} s left, needs ~{cost} s")
            continue
        t0 = time.monotonic()
        try:
            run()
        except Exception as err:  # one broken configuration must not lose the others
            traceback.print_exc()
            bench.record(group="error", config=name, error=f"{type(err).__name__}: {err}"[:2000])
        finally:
            bench.free()
        print(f"DONE {name} in {time.monotonic() - t0:.1f} s; {bench.left_s():.0f} s left", flush=True)
    records = [json.loads(line) for line in bench.records_file.read_text().splitlines()]
    results = Path(args.results) if args.results else bench.out / "RESULTS.md"
    write_results(records, info, results)
    print(results.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
