"""The rank study's pipeline on a tiny model: the sweep config runs ranks and a baseline as one
Hydra multirun, and the analysis script turns its outputs into the table, plots and heat map."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_rank_sweep_outputs_become_the_study_table_and_plots(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "study"
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    train = [sys.executable, "-m", "lightning_lora.train", "-m", "experiment=rank_sweep", "model=tiny"]
    train += ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.limit_val=32"]
    train += ["method=lora_r8,lora_r64,head_only", "seed=0", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 3  # each job its own W&B run

    analyze = [sys.executable, str(REPO / "experiments" / "rank_sweep" / "analyze.py"), str(sweep), "--out", str(out)]
    result = subprocess.run(analyze, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert (
        "| LoRA r=8 | 1 |" in table and "| LoRA r=64 | 1 |" in table and "| head only (frozen encoder) | 1 |" in table
    )
    summary = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    assert rows["lora_r64"]["trainable"] > rows["lora_r8"]["trainable"] > rows["head_only"]["trainable"]
    assert 1.0 <= rows["lora_r8"]["effective_rank"] <= 8.0
    assert 0.0 <= summary["phi_query"]["8_8"] <= 1.0
    for plot in ("accuracy_vs_rank.png", "params_vs_rank.png", "subspace_r8_r64.png"):
        assert (out / plot).stat().st_size > 10_000

    # the study README's headline block is generated from the same results.json
    (out / "README.md").write_text("# study\n<!-- headline:start -->\nstale\n<!-- headline:end -->\nend\n")
    headline = [sys.executable, str(REPO / "experiments" / "rank_sweep" / "headline.py"), "--dir", str(out)]
    result = subprocess.run(headline, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    readme = (out / "README.md").read_text()
    assert "stale" not in readme and readme.endswith("<!-- headline:end -->\nend\n")
    r8 = f"| LoRA r=8 | {100 * rows['lora_r8']['acc'][0]:.1f} ± 0.0 | — | — |"
    assert r8 in readme
