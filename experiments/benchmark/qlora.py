"""QLoRA rows of the GPU benchmark: the same Llama-shaped model with its decoder Linears in 4 bits.

Every decoder projection becomes a bitsandbytes ``Linear4bit`` (NF4 with double quantization,
bf16 compute: Lightning's ``BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)``); embeddings,
norms and ``lm_head`` stay bf16, as transformers' QLoRA keeps them. The step is the benchmark's
step (no autocast: the bnb layers compute in bf16 themselves). Rows:

* ``qlora floor``: the 4-bit model frozen, backward to the embeddings;
* ``qlora peft``: PEFT's LoRA over the 4-bit layers, adapters cast to bf16 (without autocast
  PEFT's default fp32 adapters would upcast every LoRA product); ``qlora peft autocast``:
  PEFT's defaults (fp32 adapters) under bf16 autocast, how PEFT's QLoRA recipes run;
* ``qlora ours``: ``inject_lora`` (adapters follow the bf16 compute dtype, fast path);
  ``qlora ours reference``: the same on the reference path;
* ``qlora callback``: ``LoRACallback`` in a real ``Trainer`` with Lightning's own
  ``BitsandbytesPrecision`` plugin, to the end of ``fit``: the adapter is saved and the model
  merged to dense bf16 layers; the record holds the step time and how far the merged model's
  logits are from the adapter run on the 4-bit base.
"""

from __future__ import annotations

import contextlib
import tempfile
import time

import torch
from gpu_benchmark import ALPHA, TARGETS, Bench, R, build_model, head_loss, optimizer_for
from profiling import profile_kernels

from lightning_lora import inject_lora, load_adapter, lora_parameters
from lightning_lora.fused import fast_path


def quantize_decoder(model, device: torch.device) -> None:
    """Replace every Linear of the decoder layers by an NF4 double-quantized ``Linear4bit``
    holding the same weights, quantized on ``device``."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for path, linear in list(layer.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                linear.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            parent, _, child = path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q.to(device))
    torch.cuda.empty_cache() if device.type == "cuda" else None


def qlora_model(bench: Bench, setup: str):
    """The 4-bit model prepared for ``setup``; returns (model, trainable parameters)."""
    model = build_model(bench)
    quantize_decoder(model, bench.device)
    model.requires_grad_(False)
    if setup == "floor":
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model, []
    if setup in ("ours", "ours-reference"):
        inject_lora(model, r=R, alpha=ALPHA, target_modules=TARGETS)
        return model, lora_parameters(model)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if setup == "peft":
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    return peft_model.get_base_model(), params


def run_qlora(bench: Bench, name: str, setup: str, profile: bool = False) -> None:
    model, params = qlora_model(bench, setup)
    optimizer = optimizer_for(bench, params)
    autocast = (
        torch.autocast(bench.device.type, dtype=torch.bfloat16)
        if setup == "peft-autocast"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            hidden = model.model(input_ids=bench.ids).last_hidden_state
            loss = head_loss(hidden, model.lm_head.weight, bench.labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with fast_path("never" if setup == "ours-reference" else "auto"):
        times, peak = bench.time_steps(step, bench.args.warmup, bench.args.steps)
        prof = profile_kernels(bench, step) if profile else None
    bench.record(
        group="qlora",
        config=name,
        setup=setup,
        times=times,
        peak_gib=peak,
        profile=prof,
        trainable=sum(p.numel() for p in params),
    )  # the main loop frees the model once this returns


def run_qlora_callback(bench: Bench, name: str) -> None:
    """A real ``Trainer`` with ``BitsandbytesPrecision("nf4-dq")`` and ``LoRACallback``, fit to
    the end (adapter saved, model merged), then the merged logits against the adapter loaded
    onto a freshly quantized base."""
    import lightning as L
    from lightning.pytorch.plugins import BitsandbytesPrecision
    from torch.utils.data import DataLoader, Dataset

    from lightning_lora import LoRACallback

    class LitLM(L.LightningModule):
        def __init__(self, causal_lm) -> None:
            super().__init__()
            self.lm = causal_lm

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            if batch_idx == bench.args.warmup:
                bench.sync()
                self.started = time.perf_counter()
            hidden = self.lm.model(input_ids=ids).last_hidden_state
            return head_loss(hidden, self.lm.lm_head.weight, labels)

        def on_train_end(self) -> None:
            bench.sync()
            self.seconds = (time.perf_counter() - self.started) / bench.args.steps

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=bench.cuda)

    class SameBatch(Dataset):
        def __len__(self) -> int:
            return bench.args.warmup + bench.args.steps

        def __getitem__(self, i: int):
            return bench.ids, bench.labels

    module = LitLM(build_model(bench, device=torch.device("cpu")))  # the plugin quantizes on the GPU
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            max_steps=bench.args.warmup + bench.args.steps,
            plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16, ignore_modules={"lm.lm_head"}),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[LoRACallback(r=R, alpha=ALPHA, target_modules=TARGETS, adapter_dir=f"{tmp}/adapter")],
            default_root_dir=tmp,
        )
        trainer.fit(module, DataLoader(SameBatch(), batch_size=None))
        seconds = module.seconds
        merged = module.lm.to(bench.device)
        kinds = sorted({type(m).__name__ for m in merged.model.layers[0].modules() if isinstance(m, torch.nn.Linear)})
        with torch.inference_mode():
            merged_logits = merged(input_ids=bench.ids[:1]).logits.float()
        del module, merged, trainer
        bench.free()
        fresh = torch.nn.Module()  # the adapter's names start at the LightningModule: "lm.model..."
        fresh.lm = build_model(bench, device=torch.device("cpu")).to(bench.device)  # the same random weights
        quantize_decoder(fresh.lm, bench.device)
        load_adapter(fresh, f"{tmp}/adapter")
        with torch.inference_mode():
            adapter_logits = fresh.lm(input_ids=bench.ids[:1]).logits.float()
    rel = float((merged_logits - adapter_logits).norm() / adapter_logits.norm())
    bench.record(
        group="qlora",
        config=name,
        setup="callback",
        mean_step_s=seconds,
        merged_linear_types=kinds,
        merged_vs_4bit_adapter_logits_rel=rel,
    )
    del fresh
    bench.free()
