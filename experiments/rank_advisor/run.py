"""Does the rank advice hold? From each r=64 adapter of ``experiment=rank_advisor`` (3 seeds):

1. suggest per-layer ranks at 90/95/99% of each ‖ΔW‖² (``lightning_lora.suggest_ranks``);
2. (a) resize the adapter to those ranks, no retraining (``resize_adapter_file``), and evaluate
   it on the validation and test splits with the job's own model and data;
3. (b) retrain from scratch, same seed, with the suggested ``rank_pattern`` (the default job
   with ``lora.rank_pattern`` from a generated config file: ``+advice=<name>``).

Everything lands under ``--out``; ``analyze.py`` turns it and the sweep into the table and plot::

    python -m lightning_lora.train -m experiment=rank_advisor hydra.sweep.dir=runs/rank_advisor
    python experiments/rank_advisor/run.py --sweep runs/rank_advisor --out runs/rank_advisor_advice
    python experiments/rank_advisor/analyze.py --sweep runs/rank_advisor --advice runs/rank_advisor_advice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_lora import load_adapter, resize_adapter_file
from lightning_lora.train import datamodule_attributes

ENERGIES = (0.9, 0.95, 0.99)


def base_jobs(sweep: Path) -> dict[int, Path]:
    """seed → job directory of every finished r=64 job of the sweep."""
    jobs = {}
    for metrics in sorted(sweep.glob("*/metrics.json")):
        overrides = json.loads(metrics.read_text())["overrides"]
        if "method=lora_r64" in overrides:
            seed = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("seed=")))
            jobs[seed] = metrics.parent
    if not jobs:
        sys.exit(f"{sweep} holds no finished method=lora_r64 job: run experiment=rank_advisor first.")
    return jobs


def adapter_of(job: Path) -> Path:
    (found,) = {p.parent for p in job.glob("**/lora_adapter/adapter_config.json")}
    return found


def evaluate(job: Path, adapter: Path) -> dict[str, float]:
    """Validation and test metrics of the job's base model with ``adapter`` loaded (unmerged)."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    with datamodule_attributes(datamodule):
        model = instantiate(cfg.model)
    load_adapter(model, adapter)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = {}
    for results in trainer.validate(model, datamodule=datamodule, verbose=False):
        metrics.update({k: float(v) for k, v in results.items()})
    for results in trainer.test(model, datamodule=datamodule, verbose=False):
        metrics.update({k: float(v) for k, v in results.items()})
    return metrics


def retrain(name: str, seed: int, patterns: Path, out: Path) -> dict[str, float]:
    """The default job, same seed, with ``lora.rank_pattern`` from ``patterns/advice/<name>.yaml``."""
    run_dir = out / "retrain" / name
    command = [
        sys.executable, "-m", "lightning_lora.train", f"seed={seed}", "experiment=rank_advisor", "method=lora_r64",
        f"+advice={name}", f"hydra.searchpath=[file://{patterns}]", f"hydra.run.dir={run_dir}",
        "task_name=rank_advisor_retrain",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((run_dir / "metrics.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True, help="the experiment=rank_advisor multirun directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-retrain", action="store_true", help="only resize and evaluate")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    patterns = (args.out / "patterns").absolute()
    (patterns / "advice").mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["seed"], r["energy"], r["kind"]) for r in results}
    started = time.perf_counter()
    for seed, job in base_jobs(args.sweep).items():
        adapter = adapter_of(job)
        for energy in ENERGIES:
            name = f"s{seed}_e{round(energy * 100)}"
            resized = args.out / "resized" / name
            suggestion = resize_adapter_file(adapter, resized, energy=energy)  # writes over an earlier run's
            pattern = {"rank_pattern": suggestion.rank_pattern}
            (patterns / "advice" / f"{name}.yaml").write_text("# @package lora\n" + yaml.safe_dump(pattern))
            record = {
                "seed": seed,
                "energy": energy,
                "params": suggestion.params,
                "params_before": suggestion.params_before,
                "ranks": suggestion.ranks,
            }
            if (seed, energy, "resized") not in done:
                results.append({**record, "kind": "resized", "metrics": evaluate(job, resized)})
            if not args.no_retrain and (seed, energy, "retrained") not in done:
                results.append({**record, "kind": "retrained", "metrics": retrain(name, seed, patterns, args.out)})
            results_file.write_text(json.dumps(results, indent=1))  # after each step: a stopped run resumes
            print(f"{name}: {len(results)} records, {time.perf_counter() - started:.0f} s", flush=True)
    (args.out / "wall_time.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
