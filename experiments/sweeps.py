"""Reading a Hydra multirun of ``lightning_lora.train``: one record per finished job.

Every job writes ``<job dir>/metrics.json`` (its overrides and figures) and, with LoRA, its
adapter to ``<job dir>/lora_adapter``. The study scripts in this folder build their tables from
these files only, so every number they print comes from the runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = {"head_only": "head only (frozen encoder)", "full_finetune": "full fine-tuning", "lora": "LoRA"}


def override(overrides: list[str], key: str, default: str) -> str:
    for item in overrides:
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return default


def load_jobs(sweep: Path) -> list[dict]:
    """Finished jobs of ``sweep``: directory, method, LoRA rank (from the saved adapter), seed,
    figures, start and end times."""
    jobs = []
    for path in sorted(sweep.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        adapter_config = path.parent / "lora_adapter" / "adapter_config.json"
        jobs.append(
            {
                "dir": path.parent,
                "method": override(record["overrides"], "method", "lora"),
                "r": json.loads(adapter_config.read_text())["r"] if adapter_config.is_file() else None,
                "seed": int(override(record["overrides"], "seed", "0")),
                "m": record["metrics"],
                "started": (path.parent / ".hydra").stat().st_mtime,
                "finished": path.stat().st_mtime,
            }
        )
    if not jobs:
        sys.exit(f"{sweep} holds no */metrics.json: did the sweep run?")
    return jobs


def label(job: dict) -> str:
    if job["method"].startswith("lora"):
        return f"LoRA r={job['r']}"
    return LABELS.get(job["method"], job["method"])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_pm(pair: tuple[float, float]) -> str:
    """A fraction's mean ± std in percent."""
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def wall_minutes(jobs: list[dict]) -> float:
    return (max(j["finished"] for j in jobs) - min(j["started"] for j in jobs)) / 60


def where(sweep: Path) -> str:
    return str(sweep.relative_to(REPO)) if sweep.is_relative_to(REPO) else str(sweep)
