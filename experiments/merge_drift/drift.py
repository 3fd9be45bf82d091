"""How far a correct merge moves a model's outputs, per dtype: the measurement behind
``lightning_lora.report.DRIFT_ULPS``.

For tiny Llama, BERT, T5 and GPT-2 (random weights from configs) and the pretrained all-MiniLM-L6-v2,
in float32, bfloat16 and float16: LoRA r=8 on all-linear, A and B random at trained size
(B ~ N(0, 0.05²)), three seeds; ``merge_report`` on a batch of 4×16 tokens. Prints a Markdown
table of the worst relative output drift (max |Δy| / max |y|), also in machine epsilons of the
dtype, the worst weight error in ulps, and the tolerance ``merge_report`` applies. CPU, about a
minute:

    python experiments/merge_drift/drift.py
"""

from __future__ import annotations

import torch
import transformers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lightning_lora import inject_lora
from lightning_lora.report import dtype_tolerance, merge_report
from lightning_lora.task import load_minilm

transformers.logging.set_verbosity_error()
TOKENS = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
MODELS = {
    "Llama (2×32)": (
        lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
        lambda m, x: m(x).logits,
    ),
    "BERT (2×32)": (
        lambda: BertModel(
            BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        ),
        lambda m, x: m(x).last_hidden_state,
    ),
    "T5 (2×32)": (
        lambda: T5ForConditionalGeneration(
            T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ),
        lambda m, x: m(input_ids=x, decoder_input_ids=x).logits,
    ),
    "GPT-2 (2×32)": (
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        lambda m, x: m(x).logits,
    ),
    "all-MiniLM-L6-v2": (load_minilm, lambda m, x: m(input_ids=x + 1000).last_hidden_state),
}


def main() -> None:
    print("| model | dtype | max rel drift | in eps | weight error (ulp) | tolerance |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (build, forward) in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            drift, ulps = 0.0, 0.0
            for seed in range(3):
                torch.manual_seed(seed)
                model = build().to(dtype).eval()
                inject_lora(model, r=8, init="gaussian")
                with torch.no_grad():
                    for key, p in model.named_parameters():
                        if "lora_B" in key:
                            p.normal_(0, 0.05)
                report = merge_report(model, TOKENS, forward=forward)
                drift, ulps = max(drift, report.output_max_rel_diff), max(ulps, report.weight_max_ulps)
            eps = torch.finfo(dtype).eps
            row = f"| {name} | {str(dtype).removeprefix('torch.')} | {drift:.3g} | {drift / eps:.2f} | {ulps:.2f} |"
            print(f"{row} {dtype_tolerance(dtype):.3g} |")


if __name__ == "__main__":
    main()
