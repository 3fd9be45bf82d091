"""Sweeps beyond one job after another: Hydra's joblib launcher (parallel jobs on one machine),
the SLURM launcher config, and the Optuna sweeper over alpha, rank and learning rate, each run
for real on the tiny model."""

import yaml
from omegaconf import OmegaConf

from tests.test_hydra_config import composed
from tests.test_train import run_train

TINY = ("model=tiny", "trainer.max_steps=2", "data.limit_val=32", "test=false", "logger=csv", "callbacks=none")


def hydra_node(*overrides):
    from hydra import compose, initialize_config_dir

    from lightning_lora.hydra_config import register_configs
    from lightning_lora.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True).hydra


def test_optuna_search_maximises_the_returned_metric_over_alpha_rank_and_lr():
    hydra = hydra_node("hparams_search=optuna")
    sweeper = hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"lora.r", "lora.alpha", "model.lr"}
    assert composed("hparams_search=optuna").optimized_metric == "val/acc"


def test_a_two_trial_optuna_sweep_runs_and_records_the_best_trial(tmp_path):
    run_train(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.val_check_interval=2",
        *TINY,
        multirun=True,
    )
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(jobs) == 2 and len({j.parent for j in jobs}) == 2  # its own directory each
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    accuracies = [yaml.safe_load(j.read_text())["metrics"]["val/acc"] for j in jobs]
    assert best["best_value"] == max(accuracies)
    assert set(best["best_params"]) == {"lora.r", "lora.alpha", "model.lr"}


def test_two_jobs_in_parallel_with_joblib_each_in_its_own_directory(tmp_path):
    run_train(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lora.r=2,4", *TINY, multirun=True)
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert [j.parent.name.split("_")[0] for j in jobs] == ["0", "1"]
    ranks = [yaml.safe_load((j.parent / ".hydra" / "config.yaml").read_text())["lora"]["r"] for j in jobs]
    assert ranks == [2, 4]


def test_the_slurm_launcher_config_asks_one_task_per_gpu():
    launcher = OmegaConf.to_container(hydra_node("hydra/launcher=slurm_gpu").launcher)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 1 and launcher["nodes"] == 1
