"""Turn benchmark records (``records.jsonl`` from ``gpu_benchmark.py`` and ``multi_gpu.py``) into
``RESULTS.md``: tables of medians, ratios to the frozen-base floor, peak memory, the targets, and
the profile that shows where the time goes.

    python experiments/benchmark/report.py OUT/records.jsonl [OUT2/multi.jsonl ...] \\
        --machine OUT/machine.json --out experiments/benchmark/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Targets of issue 17 (fused kernels: step and memory against the frozen floor, PEFT bf16) and of
# issue 7 (PEFT defaults, inference, callback).
EAGER_MAX, COMPILED_MAX, MEMORY_OVER_FLOOR_GIB, PEFT_BF16_GAIN_MIN = 1.07, 1.10, 1.0, 0.15
PEFT_SPEEDUP_MIN, INFER_MAX, CALLBACK_MAX = 2.0, 1.15, 1.02
QLORA_FLOOR_MAX, QLORA_PEFT_GAIN_MIN = 1.15, 0.10  # issue 14


def _by_config(records: list[dict]) -> dict[str, dict]:
    return {
        r["config"]: r
        for r in records
        if r.get("median_s") is not None or r.get("first_s") is not None or r.get("mean_step_s") is not None
    }


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("median_s") or not b.get("median_s"):
        return None
    return a["median_s"] / b["median_s"]


def _params_line(shape: dict) -> str:
    h, i, v, n = shape["hidden"], shape["intermediate"], shape["vocab"], shape["layers"]
    heads, kv = shape["heads"], shape.get("kv_heads") or shape["heads"]
    total = 2 * v * h + n * (2 * h * h + 2 * h * (h * kv // heads) + 3 * h * i + 2 * h) + h
    return (
        f"Llama-shaped model from `transformers.LlamaConfig`, random weights: {n} layers, hidden {h}, "
        f"intermediate {i}, {heads} heads ({kv} key/value heads), vocab {v} ({total / 1e6:.0f}M parameters), bf16, "
        f"batch {shape['batch']}×{shape['seq']} tokens; LoRA r=16, α=32 on q, k, v, o, gate, up, down; "
        f"fused AdamW (lr 1e-4)."
    )


def training_table(by: dict[str, dict], group: str = "train", prefix: str = "") -> list[str]:
    """The training rows of ``group``; the floors are ``<prefix>floor eager`` / ``compiled``."""
    floor_e, floor_c = by.get(f"{prefix}floor eager"), by.get(f"{prefix}floor compiled")
    rows = [
        "| configuration | path | s/step (median) | IQR | × eager floor | × floor, same mode | peak GiB | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in by.values():
        if r.get("group") != group:
            continue
        same = floor_c if r.get("compiled") else floor_e
        path = r.get("via", "")
        if r.get("setup", "").startswith("ours"):
            path += {"auto": ", fast path", "never": ", reference path", "always": ", Function forced"}.get(
                r.get("fast_path", ""), ""
            )
            if r.get("input_sharing"):
                path += ", input sharing"
            if r.get("triton_kernels") in ("auto", "always"):
                path += {"auto": ", Triton where timed faster", "always": ", Triton kernels"}[r["triton_kernels"]]
        if r.get("cuda_graphs"):
            path += ", CUDA graphs"
        if r.get("graph_breaks"):
            path += f", {r['graph_breaks']} graph breaks"
        rows.append(
            f"| {r['config']} | {path} | {_fmt_s(r['median_s'])} | {_fmt_s(r['q1_s'])}–{_fmt_s(r['q3_s'])} "
            f"| {_fmt(_ratio(r, floor_e), '.3f', '×')} | {_fmt(_ratio(r, same), '.3f', '×')} "
            f"| {_fmt(r.get('peak_gib'), '.2f')} | {r.get('trainable', 0):,} |"
        )
    return rows


def targets_table(by: dict[str, dict], prefix: str = "") -> list[str]:
    """Issue 17's targets for the rows named ``<prefix>...``; issue 7's for the default model."""
    rows = ["| target | measured | met? |", "|---|---|---|"]

    def row(what: str, value: float | None, ok: bool | None, shown: str) -> None:
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        rows.append(f"| {what} | {shown if value is not None else 'not measured'} | {mark} |")

    floor_e, floor_c = by.get(f"{prefix}floor eager"), by.get(f"{prefix}floor compiled")
    for mode, floor, most in (("eager", floor_e, EAGER_MAX), ("compiled", floor_c, COMPILED_MAX)):
        for variant in ("ours", "ours LoRA-FA"):
            ours = by.get(f"{prefix}{variant} {mode}")
            if ours is None:
                continue
            v = _ratio(ours, floor)
            row(
                f"{mode} step ≤ {most}× {mode} floor — {ours['config']}",
                v,
                v is not None and v <= most,
                f"{_fmt(v, '.3f')}×",
            )
            if ours.get("peak_gib") and floor and floor.get("peak_gib"):
                over = ours["peak_gib"] - floor["peak_gib"]
                row(
                    f"peak ≤ floor + {MEMORY_OVER_FLOOR_GIB} GiB — {ours['config']}",
                    over,
                    over <= MEMORY_OVER_FLOOR_GIB,
                    f"floor + {over:.2f} GiB ({ours['peak_gib']:.2f} vs {floor['peak_gib']:.2f})",
                )
            peft = by.get(f"{prefix}peft-bf16 {mode}")
            v = _ratio(peft, ours)
            if peft is not None:
                row(
                    f"≥ {PEFT_BF16_GAIN_MIN:.0%} faster than PEFT bf16 ({mode}) — {ours['config']}",
                    v,
                    v is not None and v >= 1 + PEFT_BF16_GAIN_MIN,
                    f"{_fmt(v, '.2f')}×",
                )
    peft = by.get(f"{prefix}peft-default eager")
    for mode in ("eager", "compiled"):
        ours = by.get(f"{prefix}ours {mode}")
        v = _ratio(peft, ours)
        if ours is not None and peft is not None:
            row(
                f"≥ {PEFT_SPEEDUP_MIN}× faster than PEFT defaults (eager) — {ours['config']}",
                v,
                v is not None and v >= PEFT_SPEEDUP_MIN,
                f"{_fmt(v, '.2f')}×",
            )
    if prefix:
        return rows
    v = _ratio(by.get("ours unmerged"), by.get("merged (plain model, after unload_lora)"))
    row(f"unmerged inference ≤ {INFER_MAX}× merged", v, v is not None and v <= INFER_MAX, f"{_fmt(v, '.3f')}×")
    for cb, fn in (("ours callback eager", "ours eager"), ("ours callback compiled", "ours compiled")):
        cbs = [by[n]["median_s"] for n in (cb, f"{cb} (repeat)") if n in by]
        fns = [by[n]["median_s"] for n in (fn, f"{fn} (repeat)") if n in by]
        if cbs and fns:
            v = (sum(cbs) / len(cbs)) / (sum(fns) / len(fns))
            runs = ", ".join(_fmt_s(x) for x in cbs) + " vs " + ", ".join(_fmt_s(x) for x in fns)
            row(f"callback within 2% of functional — {cb}", v, v <= CALLBACK_MAX, f"{v:.3f}× (mean of runs: {runs})")
    g_floor, g_ours = by.get("floor compiled + CUDA graphs"), by.get("ours compiled + CUDA graphs")
    v = _ratio(g_ours, g_floor)
    if v is not None:
        rows.append(f"| (diagnostic) compiled + CUDA graphs, ours / floor | {v:.3f}× | — |")
    return rows


def inference_tables(by: dict[str, dict]) -> list[str]:
    merged = by.get("merged (plain model, after unload_lora)")
    rows = ["| forward, 8×1024 tokens, logits | s (median) | × merged plain model | peak GiB |", "|---|---|---|---|"]
    for r in by.values():
        if r.get("group") == "infer":
            rows.append(
                f"| {r['config']} | {_fmt_s(r['median_s'])} | {_fmt(_ratio(r, merged), '.3f', '×')} "
                f"| {_fmt(r.get('peak_gib'), '.2f')} |"
            )
    rows += ["", "| merge the whole model | first call | median of repeats | rel. diff of logits, merged vs unmerged |"]
    rows.append("|---|---|---|---|")
    for r in by.values():
        if r.get("group") == "merge":
            rows.append(
                f"| {r['config']} | {_fmt_s(r.get('first_s'))} | {_fmt_s(r.get('median_s'))} "
                f"| {_fmt(r.get('rel_diff_logits'), '.2e')} |"
            )
    return rows


def micro_table(by: dict[str, dict]) -> list[str]:
    micro = [r for r in by.values() if r.get("group") == "micro"]
    if not micro:
        return []
    rows = [
        "| one layer, all tokens of the batch | wall µs (median) | device µs (kernels) | device µs over frozen | × frozen (device) |",
        "|---|---|---|---|---|",
    ]
    variants = (
        "frozen Linear",
        "frozen",
        "reference",
        "fast path, Triton",
        "fast path",
        "three fast-path layers",
        "sharing x Aᵀ",
    )

    def key(config: str) -> str:
        for v in variants:
            config = config.replace(v, "{v}")
        return config

    frozen = {key(r["config"]): r.get("device_us") for r in micro if "frozen" in r["config"]}
    for r in micro:
        base, dev = frozen.get(key(r["config"])), r.get("device_us")
        own = base is None or dev is None or "frozen" in r["config"]
        extra, times = ("", "") if own else (f"{dev - base:+.0f}", f"{dev / base:.3f}×")
        diff = f" (grads vs three layers: rel. {r['rel_diff_grads']:.1e})" if r.get("rel_diff_grads") else ""
        rows.append(f"| {r['config']}{diff} | {r['median_s'] * 1e6:.0f} | {_fmt(dev, '.0f')} | {extra} | {times} |")
    return rows


def profile_tables(by: dict[str, dict]) -> list[str]:
    out: list[str] = []
    for mode, names in (
        ("eager", ["floor eager", "ours eager", "ours eager, reference path"]),
        ("compiled", ["floor compiled", "ours compiled"]),
    ):
        profs = [(n, by[n]["profile"]) for n in names if n in by and by[n].get("profile")]
        if len(profs) < 2:
            continue
        cats = sorted({c for _, p in profs for c in p["categories_us"]})
        head = " | ".join(n for n, _ in profs)
        out += [
            f"**{mode}**: device time per step by kernel kind (ms; 3 profiled steps averaged)",
            "",
            f"| kind | {head} | Δ {profs[1][0]} − {profs[0][0]} |",
            "|---|" + "---|" * (len(profs) + 1),
        ]
        for c in [*cats, "total"]:
            vals = [p["categories_us"].get(c, 0.0) if c != "total" else p["total_us"] for _, p in profs]
            cells = " | ".join(f"{v / 1e3:.1f}" for v in vals)
            label = "**device total**" if c == "total" else c
            out.append(f"| {label} | {cells} | {(vals[1] - vals[0]) / 1e3:+.1f} |")
        walls = [by[n]["median_s"] * 1e6 for n, _ in profs]
        idle = [w - p["total_us"] for w, (_, p) in zip(walls, profs, strict=True)]
        cpu = [p.get("cpu_self_us", 0.0) for _, p in profs]
        for label, vals in (
            ("wall (median step)", walls),
            ("GPU idle = wall − device", idle),
            ("CPU self time, profiled", cpu),
        ):
            cells = " | ".join(f"{v / 1e3:.1f}" for v in vals)
            out.append(f"| {label} | {cells} | {(vals[1] - vals[0]) / 1e3:+.1f} |")
        floor_k, ours_k = profs[0][1]["kernels"], profs[1][1]["kernels"]
        deltas = []
        for k in set(floor_k) | set(ours_k):
            a, b = floor_k.get(k, {"us": 0, "count": 0}), ours_k.get(k, {"us": 0, "count": 0})
            deltas.append((b["us"] - a["us"], k, a, b))
        deltas.sort(reverse=True)
        out += [
            "",
            f"Kernels that gained the most device time per step ({profs[1][0]} vs {profs[0][0]}; top 40 kernels of each profiled):",
            "",
            "| kernel | floor ms (calls) | ours ms (calls) | Δ ms |",
            "|---|---|---|---|",
        ]
        for d, k, a, b in deltas[:12]:
            name = k if len(k) <= 90 else k[:87] + "..."
            name = name.replace("|", "\\|")
            out.append(
                f"| `{name}` | {a['us'] / 1e3:.2f} ({a['count']:.0f}) | {b['us'] / 1e3:.2f} ({b['count']:.0f}) "
                f"| {d / 1e3:+.2f} |"
            )
        out.append("")
    return out


def qlora_tables(by: dict[str, dict]) -> list[str]:
    """The 4-bit rows: step and memory against the 4-bit floor, the targets of issue 14, and the
    Trainer run with Lightning's bitsandbytes plugin to the end of fit."""
    rows = [r for r in by.values() if r.get("group") == "qlora" and r.get("median_s")]
    if not rows:
        return []
    floor = by.get("qlora floor")
    lines = [
        "| configuration | s/step (median) | IQR | × 4-bit floor | peak GiB | trainable |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {_fmt_s(r['median_s'])} | {_fmt_s(r['q1_s'])}–{_fmt_s(r['q3_s'])} "
            f"| {_fmt(_ratio(r, floor), '.3f', '×')} | {_fmt(r.get('peak_gib'), '.2f')} | {r.get('trainable', 0):,} |"
        )
    ours = by.get("qlora ours")
    pefts = [by[k] for k in ("qlora peft", "qlora peft autocast") if by.get(k, {}).get("median_s")]
    best_peft = min(pefts, key=lambda r: r["median_s"]) if pefts else None
    lines += ["", "| target | measured | met? |", "|---|---|---|"]
    ratio = _ratio(ours, floor)
    if ratio is not None:
        lines.append(
            f"| ours ≤ {QLORA_FLOOR_MAX}× the 4-bit floor | {ratio:.3f}× | {'yes' if ratio <= QLORA_FLOOR_MAX else '**no**'} |"
        )
    if ours and best_peft:
        gain = 1 - ours["median_s"] / best_peft["median_s"]
        ok = gain >= QLORA_PEFT_GAIN_MIN
        lines.append(
            f"| ours ≥ {QLORA_PEFT_GAIN_MIN:.0%} faster than PEFT's best QLoRA step ({best_peft['config']}) "
            f"| {gain:.1%} | {'yes' if ok else '**no**'} |"
        )
    fit = by.get("qlora callback")
    if fit:
        lines += [
            "",
            f'`Trainer(plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16))` + `LoRACallback`, fit '
            f"to the end: mean step {_fmt_s(fit.get('mean_step_s'))}; after fit the decoder's Linear layers are "
            f"{', '.join(fit.get('merged_linear_types', []))} (merged, bf16); merged logits vs the saved adapter "
            f"loaded onto a freshly quantized base: relative difference "
            f"{_fmt(fit.get('merged_vs_4bit_adapter_logits_rel'), '.1e')}: both hold the same dequantized W, so this is "
            "the bf16 rounding of the merged weights, of the order of a bf16 merge of the dense model (above).",
        ]
    return lines


def side_table(by: dict[str, dict], group: str, floor_name: str, reference_name: str) -> list[str]:
    """The rows of ``group`` with their ratios to ``floor_name`` and to ``reference_name``."""
    rows = [r for r in by.values() if r.get("group") == group and r.get("median_s")]
    if not rows:
        return []
    floor, reference = by.get(floor_name), by.get(reference_name)
    lines = [
        f"| configuration | path | s/step (median) | IQR | × {floor_name} | × {reference_name} | peak GiB | × its peak | trainable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r.get("peak_gib")
        peak_ratio = peak / reference["peak_gib"] if peak and reference and reference.get("peak_gib") else None
        lines.append(
            f"| {r['config']} | {r.get('via', '')}, fast path {r.get('fast_path', '')} | {_fmt_s(r['median_s'])} "
            f"| {_fmt_s(r['q1_s'])}–{_fmt_s(r['q3_s'])} | {_fmt(_ratio(r, floor), '.3f', '×')} "
            f"| {_fmt(_ratio(r, reference), '.3f', '×')} | {_fmt(peak, '.2f')} | {_fmt(peak_ratio, '.2f', '×')} "
            f"| {r.get('trainable', 0):,} |"
        )
    return lines


STRATEGIES = ("ddp", "fsdp", "fsdp-split", "fsdp2", "deepspeed3")


def multi_gpu_table(records: list[dict]) -> list[str]:
    multi = [r for r in records if r.get("group") == "multi"]
    if not multi:
        return []
    ddp = next((r for r in multi if r["config"] == "LoRA + ddp"), None)
    rows = [
        f"Each strategy: `python experiments/benchmark/multi_gpu.py --strategy <{'|'.join(STRATEGIES)}> "
        f"--devices N --out OUT` on {multi[0].get('device', '?')} (torch {multi[0].get('torch')}, lightning "
        f"{multi[0].get('lightning')}), one process per strategy, in one device call; "
        f"LoRA injected by the callback before wrapping or sharding; precision bf16-true; "
        f"{multi[0].get('per_gpu_batch')} tokens per GPU; 20 timed steps after 5. "
        "*fsdp*: `FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})`; *fsdp-split*: "
        "`lightning_lora.distributed.frozen_linear_policy({LlamaDecoderLayer})` (frozen Linears in units of their own); "
        "*fsdp2*: `ModelParallelStrategy`, `fully_shard` per decoder layer in `configure_model`; *deepspeed3*: "
        "`DeepSpeedStrategy(stage=3, exclude_frozen_parameters=True)`. The last column compares bf16 adapters "
        "after 26 AdamW steps: in fp32 (`--precision 32-true --smoke`, 2 CPU ranks) FSDP2's equals DDP's exactly.",
        "",
        "| strategy | s/step (median, per rank) | × DDP | peak GiB per GPU (per rank) | saved adapter on 1 GPU vs sharded model (max abs diff of logits) | merged vs unmerged logits (rel.) | adapter vs DDP's (max rel.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in multi:
        medians = ", ".join(_fmt_s(m) for m in r.get("medians_s", []))
        peaks = ", ".join(f"{p:.2f}" for p in r.get("peaks_gib", []))
        rows.append(
            f"| {r['config'].removeprefix('LoRA + ')} | {medians} | {_fmt(_ratio(r, ddp), '.2f', '×')} | {peaks} "
            f"| {_fmt(r.get('adapter_on_one_gpu_vs_sharded_logits_max_abs'), '.1e')} "
            f"| {_fmt(r.get('merged_vs_unmerged_logits_rel'), '.1e')} | {_fmt(r.get('adapter_vs_ddp_adapter_rel_max'), '.1e')} |"
        )
    return rows


def write_results(records: list[dict], info: dict, path: Path) -> None:
    by = _by_config(records)
    lines = [
        "# Benchmark: LoRA training speed and memory (generated)",
        "",
        f"Generated by `experiments/benchmark/report.py` from one run of `{info.get('command', '?')}` on "
        f"**{info.get('device', '?')}**, {info.get('date', '')}: torch {info.get('torch')}, CUDA {info.get('cuda')}, "
        f"transformers {info.get('transformers')}, peft {info.get('peft')}, lightning {info.get('lightning')}.",
        "",
    ]
    if "shape" in info:
        lines += [_params_line(info["shape"]), ""]
    lines += [
        "Step = forward → fp32 cross-entropy → backward → optimizer step. Median over the timed steps "
        "(CUDA events between step starts) after warm-up; peak = `torch.cuda.max_memory_allocated` over "
        "the timed steps. *Compiled* = every decoder layer compiled in place plus the loss head, the same "
        "for every configuration. The floor trains nothing but runs backward to the embeddings.",
        "",
        "## Training step",
        "",
        *training_table(by),
        "",
        "## Targets",
        "",
        *targets_table(by),
        "",
    ]
    eight_b = training_table(by, "8b", "8B ")
    if len(eight_b) > 2:
        lines += [
            "## An 8B-class model: four decoder layers of Llama-3-8B",
            "",
            *([_params_line(info["shape_8b"]), ""] if "shape_8b" in info else []),
            "Same step, batch and LoRA settings as above, in the same run; the floors are this model's own.",
            "",
            *eight_b,
            "",
            *targets_table(by, "8B "),
            "",
        ]
    lines += [
        "## Inference and merging",
        "",
        *inference_tables(by),
        "",
    ]
    micro = micro_table(by)
    if micro:
        lines += ["## One adapted layer", "", *micro, ""]
    profiles = profile_tables(by)
    if profiles:
        lines += ["## Where the time goes (torch.profiler)", "", *profiles]
    autocast = side_table(by, "autocast", "floor bf16 autocast", "ours bf16 autocast, reference path")
    if autocast:
        lines += [
            "## Under autocast (bf16-mixed)",
            "",
            "The same model and step with each forward under `torch.autocast(dtype=bfloat16)`, as "
            'Lightning\'s `precision="bf16-mixed"` runs it; the reference path is how every release '
            "before the autocast fast path ran.",
            "",
            *autocast,
            "",
        ]
    dora = side_table(by, "dora", "ours LoRA eager (beside DoRA)", "ours LoRA eager (beside DoRA)")
    if dora:
        lines += ["## DoRA against LoRA, ours and PEFT's (eager, bf16)", "", *dora, ""]
    qlora = qlora_tables(by)
    if qlora:
        lines += ["## QLoRA: the decoder in 4 bits (NF4, double quantization, bf16 compute)", "", *qlora, ""]
    multi = multi_gpu_table(records)
    if multi:
        lines += ["## Strategies: DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3 (Lightning, LoRACallback)", "", *multi, ""]
    problems = [r for r in records if r.get("error")]
    if problems:
        lines += ["## Not measured", ""]
        lines += [f"- {r['config']}: {r['error'].splitlines()[0][:300]}" for r in problems]
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+")
    parser.add_argument("--machine", help="machine.json of a gpu_benchmark run; leave out for multi_gpu records only")
    parser.add_argument("--out", default="experiments/benchmark/RESULTS.md")
    args = parser.parse_args()
    records = [json.loads(line) for f in args.records for line in Path(f).read_text().splitlines() if line.strip()]
    if args.machine is None:  # strategy runs alone: their table, with where it came from
        sources = ", ".join(f"`{f}`" for f in args.records)
        lines = ["# Lightning strategies with LoRA (generated)", "", f"From {sources}.", "", *multi_gpu_table(records)]
        Path(args.out).write_text("\n".join(lines) + "\n")
        return
    write_results(records, json.loads(Path(args.machine).read_text()), Path(args.out))


if __name__ == "__main__":
    main()
