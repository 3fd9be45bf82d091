"""The rank advisor's study as a table and a plot, from the runs only.

    python experiments/rank_advisor/analyze.py --sweep SWEEP_DIR --advice ADVICE_DIR [--out DIR]

Reads the ``experiment=rank_advisor`` multirun (uniform r = 4, 8, 16, 64 and full fine-tuning,
3 seeds) and ``run.py``'s records (the r=64 adapters resized to 90/95/99% of each ‖ΔW‖², and
retrained from scratch at those per-layer ranks). Writes ``results.md`` / ``results.json`` and
``accuracy_vs_params.png`` (test accuracy against trainable parameters, the Pareto front drawn)
into DIR (default: this script's folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/sweeps.py
from sweeps import fmt_pm, load_jobs, mean_std, wall_minutes, where  # noqa: E402

HEAD_PARAMS = "lora/trainable_params"


def rows(sweep: Path, advice: Path) -> list[dict]:
    """One row per setting: its label, kind, trainable parameters and accuracies over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for job in load_jobs(sweep):
        name = (
            "full fine-tuning" if job["method"] == "full_finetune" else f"LoRA r={job['method'].removeprefix('lora_r')}"
        )
        groups[(name, "uniform")].append(
            {"params": job["m"][HEAD_PARAMS], "val": job["m"]["val/acc"], "test": job["m"]["test/acc"]}
        )
    records = json.loads((advice / "results.json").read_text())
    base = {j["seed"]: j for j in load_jobs(sweep) if j["method"] == "lora_r64"}
    for record in records:
        pct = round(record["energy"] * 100)
        m = record["metrics"]
        if record["kind"] == "resized":  # its A/B, plus the head the base job trained (kept as it is)
            head = base[record["seed"]]["m"][HEAD_PARAMS] - record["params_before"]
            params = record["params"] + head
            name = f"r=64 resized to {pct}% energy (no retraining)"
        else:
            params = m[HEAD_PARAMS]
            name = f"retrained at the ranks for {pct}% energy"
        groups[(name, record["kind"])].append({"params": params, "val": m["val/acc"], "test": m["test/acc"]})
    out = []
    for (name, kind), runs in groups.items():
        out.append(
            {
                "setting": name,
                "kind": kind,
                "seeds": len(runs),
                "params": sum(r["params"] for r in runs) / len(runs),
                "val": mean_std([r["val"] for r in runs]),
                "test": mean_std([r["test"] for r in runs]),
            }
        )
    return sorted(out, key=lambda r: -r["params"])


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer parameters and higher accuracy."""
    front, best = [], -1.0
    for p, acc in sorted(points):
        if acc > best:
            front.append((p, acc))
            best = acc
    return front


def plot(table: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform": ("o", "tab:blue"), "resized": ("s", "tab:orange"), "retrained": ("^", "tab:green")}
    for kind, (marker, color) in styles.items():
        chosen = [r for r in table if r["kind"] == kind]
        ax.errorbar(
            [r["params"] for r in chosen],
            [100 * r["test"][0] for r in chosen],
            yerr=[100 * r["test"][1] for r in chosen],
            fmt=marker,
            color=color,
            capsize=3,
            label={"uniform": "uniform rank / full fine-tuning", "resized": "r=64 resized (no retraining)",
                   "retrained": "retrained at suggested ranks"}[kind],
        )  # fmt: skip
        for r in chosen:
            ax.annotate(r["setting"].split(" (")[0].replace("retrained at the ranks for ", "").replace(
                "r=64 resized to ", ""), (r["params"], 100 * r["test"][0]), fontsize=6, xytext=(3, 3),
                textcoords="offset points")  # fmt: skip
    front = pareto([(r["params"], 100 * r["test"][0]) for r in table])
    ax.plot([p for p, _ in front], [a for _, a in front], "--", color="gray", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (A/B and the head)")
    ax.set_ylabel("test accuracy % (mean ± std, 3 seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True)
    parser.add_argument("--advice", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    table = rows(args.sweep, args.advice)
    wall = json.loads((args.advice / "wall_time.json").read_text())["seconds"] / 60
    lines = [
        "<!-- generated by experiments/rank_advisor/analyze.py from the runs; do not edit -->",
        f"Sweep `{where(args.sweep)}` ({wall_minutes(load_jobs(args.sweep)):.0f} min) and advice "
        f"`{where(args.advice)}` ({wall:.0f} min) on this 2-core CPU machine; the default job's schedule.",
        "",
        "| setting | seeds | trainable params | val accuracy % | test accuracy % |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['setting']} | {r['seeds']} | {r['params']:,.0f} | {fmt_pm(r['val'])} | {fmt_pm(r['test'])} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(table, indent=1))
    plot(table, args.out / "accuracy_vs_params.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
