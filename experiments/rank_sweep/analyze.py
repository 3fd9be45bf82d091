"""Turn a rank-sweep multirun into the study's table, plots and subspace heat maps.

    python experiments/rank_sweep/analyze.py [SWEEP_DIR] [--out DIR]

SWEEP_DIR defaults to the newest ``multirun/rank_sweep/*``; DIR to this script's folder. Reads
only what the jobs wrote (each job's ``metrics.json`` and ``lora_adapter/``), so every number in
``results.md`` comes from the runs. Writes:

* ``results.md`` / ``results.json``: per method, mean ± std over seeds of validation accuracy and
  macro-F1, trainable parameters (count and %), adapter bytes, the mean effective rank of ΔW,
  median step time, peak memory (the largest over seeds), fit and job time; the sweep's wall time; the subspace similarities;
* ``accuracy_vs_rank.png``, ``params_vs_rank.png``, ``subspace_r8_r64.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

from lightning_lora.analysis import delta_singular_values, effective_rank, subspace_similarity_grid

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/sweeps.py
from sweeps import REPO, fmt_pm, label, load_jobs, mean_std, wall_minutes, where  # noqa: E402

# The heat maps compare the adapters of the last attention block (the paper's Fig. 3 shows one
# layer): ``<...>.layer.<N>.attention.self.{query,value}`` with the largest N.
QUERY_A = re.compile(r"base_model\.model\.(?P<block>.+\.layer\.(?P<n>\d+)\.attention\.self)\.query\.lora_A\.weight")


def newest_sweep() -> Path:
    sweeps = sorted((REPO / "multirun" / "rank_sweep").glob("*"))
    if not sweeps:
        sys.exit("no multirun/rank_sweep/* found: run `python -m lightning_lora.train -m experiment=rank_sweep` first")
    return sweeps[-1]


def adapter(job: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The job's saved adapter: (adapter_config.json, tensors), or None for a baseline."""
    directory = job["dir"] / "lora_adapter"
    if not (directory / "adapter_model.safetensors").is_file():
        return None
    return json.loads((directory / "adapter_config.json").read_text()), load_file(
        directory / "adapter_model.safetensors"
    )


def mean_effective_rank(job: dict) -> float | None:
    """Mean over adapted weights of the effective rank of ΔW = (alpha/r)·B A."""
    saved = adapter(job)
    if saved is None:
        return None
    config, tensors = saved
    ranks = []
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            ranks.append(effective_rank(delta_singular_values(A, B, config["lora_alpha"] / A.shape[0])))
    return statistics.fmean(ranks)


def summarise(jobs: list[dict]) -> list[dict]:
    """One row per method: LoRA ranks in increasing order, then the baselines."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        by_method[job["method"]].append(job)
    rows = []
    for method, group in by_method.items():
        first = group[0]["m"]
        eff = [e for e in map(mean_effective_rank, group) if e is not None]
        rows.append(
            {
                "method": method,
                "label": label(group[0]),
                "r": group[0]["r"],
                "seeds": len(group),
                "acc": mean_std([j["m"]["val/acc"] for j in group]),
                "f1": mean_std([j["m"]["val/f1"] for j in group]),
                "trainable": first["lora/trainable_params"],
                "ratio": first["lora/trainable_ratio"],
                "adapter_bytes": first.get("lora/adapter_bytes"),
                "effective_rank": statistics.fmean(eff) if eff else None,
                "step_s": statistics.median(j["m"]["perf/step_time_median_s"] for j in group),
                "peak_mb": max(j["m"]["perf/peak_memory_mb"] for j in group),
                "fit_s": statistics.fmean(j["m"]["perf/fit_wall_s"] for j in group),
                "job_s": statistics.fmean(j["m"]["perf/job_wall_s"] for j in group),
            }
        )
    return sorted(rows, key=lambda row: (row["r"] is None, row["r"] or 0, row["method"]))


def similarity(jobs: list[dict]) -> tuple[str, int, dict[str, torch.Tensor]]:
    """The last attention block, its input width, and the φ(A_{r=8}, A_{r=64}, i, j) grids of
    its query and value adapters from the seed-0 jobs (empty if the sweep lacks them)."""
    pick = {(j["r"], j["seed"]): j for j in jobs if j["r"] is not None}
    if (8, 0) not in pick or (64, 0) not in pick:
        return "", 0, {}
    (_, small), (_, large) = adapter(pick[8, 0]), adapter(pick[64, 0])
    block = max((m for m in map(QUERY_A.fullmatch, small) if m), key=lambda m: int(m["n"]))["block"]
    grids, d_in = {}, 0
    for proj in ("query", "value"):
        key = f"base_model.model.{block}.{proj}.lora_A.weight"
        grids[proj] = subspace_similarity_grid(small[key].float(), large[key].float())
        d_in = small[key].shape[1]
    return block, d_in, grids


def plot_accuracy(rows: list[dict], out: Path) -> None:
    lora = [r for r in rows if r["r"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [r["r"] for r in lora]
    ax.errorbar(
        ranks, [r["acc"][0] for r in lora], yerr=[r["acc"][1] for r in lora], marker="o", capsize=3, label="LoRA"
    )
    for row, color in zip([r for r in rows if r["r"] is None], ["tab:gray", "tab:red"], strict=False):
        mean, std = row["acc"]
        ax.axhline(mean, color=color, linestyle="--", label=row["label"])
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r (all linear layers adapted)")
    ax.set_ylabel("validation accuracy (mean ± std over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_params(rows: list[dict], out: Path) -> None:
    lora = [r for r in rows if r["r"] is not None]
    ranks = [r["r"] for r in lora]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [r["trainable"] for r in lora], marker="o", label="LoRA (adapters + head)")
    for row, color in zip([r for r in rows if r["r"] is None], ["tab:gray", "tab:red"], strict=False):
        ax.axhline(row["trainable"], color=color, linestyle="--", label=row["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_similarity(block: str, grids: dict[str, torch.Tensor], out: Path) -> None:
    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 3.2), squeeze=False)
    for ax, (proj, grid) in zip(axes[0], grids.items(), strict=True):
        extent = (0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5)
        image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis", extent=extent)
        ax.set_xlabel("j (top directions of A, r=64)")
        ax.set_ylabel("i (top directions of A, r=8)")
        ax.set_title(f"φ(A₈, A₆₄, i, j): {block.split('encoder.')[-1]}.{proj}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_results(sweep: Path, jobs: list[dict], rows: list[dict], similar: tuple, out: Path) -> None:
    wall = wall_minutes(jobs)
    lines = [
        "<!-- generated by experiments/rank_sweep/analyze.py from the sweep's outputs; do not edit -->",
        f"Sweep `{where(sweep)}`: {len(jobs)} jobs, wall time {wall:.1f} min (first job start to last job end).",
        "",
        "| method | seeds | val accuracy % | val macro-F1 % | trainable params | trainable % | adapter bytes "
        "| effective rank of ΔW | median step s | peak RSS MB | fit s | job s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = f"{int(row['adapter_bytes']):,}" if row["adapter_bytes"] else "—"
        eff = f"{row['effective_rank']:.2f}" if row["effective_rank"] is not None else "—"
        lines.append(
            f"| {row['label']} | {row['seeds']} | {fmt_pm(row['acc'])} | {fmt_pm(row['f1'])} | {int(row['trainable']):,} "
            f"| {100 * row['ratio']:.3f} | {size} | {eff} | {row['step_s']:.3f} | {row['peak_mb']:,.0f} | {row['fit_s']:.1f} | {row['job_s']:.1f} |"
        )
    summary = {"jobs": len(jobs), "wall_min": wall, "rows": rows}
    block, d_in, grids = similar
    if grids:
        lines += ["", f"Subspace similarity φ between the r=8 and r=64 adapters (seed 0) of `{block}`:", ""]
        lines += [
            "| projection | φ(1, 1) | φ(8, 8) | φ(8, 64) | chance φ(1, 1) = 1/d_in | chance φ(8, 8) = 8/d_in "
            "| chance φ(8, 64) = 64/d_in |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for proj, grid in grids.items():
            lines.append(
                f"| {proj} | {grid[0, 0]:.3f} | {grid[7, 7]:.3f} | {grid[7, -1]:.3f} | {1 / d_in:.4f} | {8 / d_in:.3f} "
                f"| {min(1.0, grid.shape[1] / d_in):.3f} |"
            )
            summary[f"phi_{proj}"] = {"1_1": float(grid[0, 0]), "8_8": float(grid[7, 7]), "8_64": float(grid[7, -1])}
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", type=Path, help="multirun directory (default: newest rank_sweep)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results and plots go (default: this folder)")
    args = parser.parse_args(argv)
    sweep = (args.sweep or newest_sweep()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(sweep)
    rows = summarise(jobs)
    similar = similarity(jobs)
    plot_accuracy(rows, args.out / "accuracy_vs_rank.png")
    plot_params(rows, args.out / "params_vs_rank.png")
    if similar[2]:
        plot_similarity(similar[0], similar[2], args.out / "subspace_r8_r64.png")
    write_results(sweep, jobs, rows, similar, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
