"""The study configs compose, job by job, to what they say they run."""

import itertools

import pytest
from hydra import compose, initialize_config_dir

from lightning_lora.hydra_config import register_configs
from lightning_lora.train import CONF_DIR


def sweep(experiment: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def job(experiment: str, **overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="train", overrides=[f"experiment={experiment}", *(f"{k}={v}" for k, v in overrides.items())]
        )


@pytest.mark.parametrize(("experiment", "jobs"), [("alpha_rank", 54), ("rank_advisor", 15)])
def test_a_study_sweeps_every_combination_of_its_params(experiment, jobs):
    params = sweep(experiment)
    assert len(list(itertools.product(*params.values()))) == jobs
    assert params["seed"] == ["0", "1", "2"]


def test_alpha_rank_jobs_set_rank_alpha_and_scaling_on_the_short_schedule():
    cfg = job("alpha_rank", method="lora", **{"lora.r": "32", "lora.alpha": "64", "lora.use_rslora": "true"}, seed="2")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.use_rslora, cfg.seed) == (32, 64.0, True, 2)
    assert cfg.trainer.max_steps == 60 and cfg.task_name == "alpha_rank"


def test_rank_advisor_jobs_run_the_default_schedule_with_csv_logs_and_no_checkpoints():
    lora = job("rank_advisor", method="lora_r64", seed="1")
    assert lora.lora.r == 64 and lora.trainer.max_epochs == 3 and list(lora.logger) == ["csv"]
    assert "model_checkpoint" not in lora.callbacks and lora.test is True
    assert "lora" not in job("rank_advisor", method="full_finetune", seed="0")


def test_variant_jobs_set_their_variant_on_the_rank_advisors_schedule():
    assert sweep("variants")["method"] == ["lora_dora", "lora_plus", "lora_rank_pattern", "lora_pissa", "lora_fa"]
    assert job("variants", method="lora_fa", seed="1").lora.freeze_a is True
    assert job("variants", method="lora_dora", seed="1").lora.use_dora is True
    assert job("variants", method="lora_plus", seed="1").lora.loraplus_lr_ratio == 16
    assert job("variants", method="lora_plus4", seed="1").lora.loraplus_lr_ratio == 4
    assert job("variants", method="lora_pissa", seed="1").lora.init == "pissa"
    ranks = job("variants", method="lora_rank_pattern", seed="1").lora
    assert ranks.r == 4 and dict(ranks.rank_pattern) == {"query": 16, "value": 16}
    plain = job("rank_advisor", method="lora_r8", seed="1")
    dora = job("variants", method="lora_dora", seed="1")
    assert dora.trainer == plain.trainer and list(dora.logger) == list(plain.logger) == ["csv"]
