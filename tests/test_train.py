"""The Hydra entry point: real composition, real subprocess runs, a real offline W&B run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from lightning_lora import LoRACallback
from lightning_lora.train import CONF_DIR, instantiate_nodes

from .wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parent.parent


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


def test_default_config_is_lora_on_minilm_with_offline_wandb():
    cfg = composed()
    assert cfg.lora._target_ == "lightning_lora.LoRACallback"
    assert cfg.model.encoder._target_ == "lightning_lora.task.load_minilm"
    assert cfg.logger.wandb.offline is True


def test_overrides_reach_the_callback_and_trainer():
    cfg = composed("lora.r=4", "lora.target_modules=[query,value]", "trainer.max_epochs=1", "logger=csv")
    callback = instantiate(cfg.lora)
    assert isinstance(callback, LoRACallback)
    assert (callback.config.r, callback.config.target_modules) == (4, ["query", "value"])
    assert cfg.trainer.max_epochs == 1
    assert list(cfg.logger) == ["csv"]


def test_misspelled_lora_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="rank"):
        composed("lora.rank=4")
    cfg = composed("+lora.rank=4")  # forced in: the callback refuses it by name
    with pytest.raises(InstantiationException, match=r"no field 'rank' \(did you mean 'r'\?\)"):
        instantiate(cfg.lora)


def test_bad_value_fails_at_construction_naming_the_field():
    with pytest.raises(InstantiationException, match=r"LoRAConfig\.r must be a positive int"):
        instantiate(composed("lora.r=0").lora)


@pytest.mark.parametrize(("experiment", "jobs"), [("rank_sweep", 27), ("rank_sweep_long", 27), ("alpha_sweep", 21)])
def test_every_job_of_a_sweep_experiment_composes_to_what_it_names(experiment, jobs):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = {key: str(values).split(",") for key, values in sweep.hydra.sweeper.params.items()}
    assert params["seed"] == ["0", "1", "2"]
    assert len(params["seed"]) * max(len(v) for k, v in params.items() if k != "seed") == jobs
    (key,) = set(params) - {"seed"}
    for value in params[key]:
        job = composed(f"experiment={experiment}", f"{key}={value}", "seed=1")
        assert job.task_name == experiment and job.seed == 1 and job.test is False
        if key == "lora.alpha":
            assert (job.lora.r, job.lora.alpha) == (8, float(value))
        elif value.startswith("lora_r"):
            assert job.lora.r == int(value.removeprefix("lora_r"))
        else:
            assert "lora" not in job and value in ("head_only", "full_finetune")


def test_baseline_methods_drop_lora_and_rank_methods_set_r():
    head_only = composed("method=head_only")
    assert "lora" not in head_only and head_only.model.freeze_encoder is True
    assert "lora" not in composed("method=full_finetune")
    assert composed("method=lora_r64").lora.r == 64
    assert composed("method=lora_r64", "lora.r=3").lora.r == 3  # the command line still wins


def test_dropping_the_lora_node_drops_the_callback():
    cfg = composed("~lora", "callbacks=none")  # Hydra 1.3 refuses `lora=null` on the command line
    assert "lora" not in cfg and cfg.callbacks.lora is None
    assert [type(c).__name__ for c in instantiate_nodes(cfg, "callbacks")] == ["RunStats"]
    assert [type(c).__name__ for c in instantiate_nodes(composed("callbacks=none"), "callbacks")] == [
        "RunStats",
        "LoRACallback",
    ]


def test_a_node_left_without_its_target_is_an_error_naming_it():
    cfg = composed("experiment=alpha_sweep", "method=head_only")  # sets lora.r, then drops the lora node
    assert cfg.callbacks.lora == {"r": 8}
    with pytest.raises(ValueError, match=r"cfg\.callbacks\.lora has no _target_ \(it holds only \['r'\]\)"):
        instantiate_nodes(cfg, "callbacks")


def test_the_model_reads_its_classes_from_the_data_module_only_inside_train():
    model = composed("model=tiny").model
    assert OmegaConf.to_container(model)["num_classes"] == "${datamodule:num_classes}"  # not restated here
    with pytest.raises(InterpolationResolutionError, match=r"resolves only while train\(\) runs"):
        instantiate(model)


def run_train(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's package (and tests.user_conf), whatever is installed.
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    where = f"hydra.sweep.dir={tmp_path}" if multirun else f"hydra.run.dir={tmp_path}"
    cmd = [sys.executable, "-m", "lightning_lora.train", *(["-m"] if multirun else []), where, *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_fast_dev_run_of_the_default_job(tmp_path):
    run_train(tmp_path, "trainer.fast_dev_run=true")
    # fast_dev_run disables every logger: the adapter lands under default_root_dir.
    assert (tmp_path / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "wandb").exists()


def test_two_steps_with_the_default_wandb_logger_record_the_lora_figures(tmp_path):
    run_train(tmp_path, "trainer.max_steps=2", "data.limit_val=64", "test=false")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run.history["lora/trainable_params"] == 339_476  # r=8 on every Linear of MiniLM, plus the head
    assert run.history["lora/total_params"] > 22_000_000
    assert 0 < run.history["lora/trainable_ratio"] < 0.05
    assert run.config["lora"]["r"] == 8 and run.config["lora"]["target_modules"] == "all-linear"
    assert run.config["model"]["encoder"]["_target_"] == "lightning_lora.task.load_minilm"  # resolved Hydra config
    assert 1.0 <= run.history["lora_delta/effective_rank_mean"] <= 8.0  # log_analysis is on in conf/lora
    assert run.history["lora/delta_stats/_type"] == "table-file"  # the per-weight table:
    assert run.history["lora/delta_stats/nrows"] == 36  # one row per adapted weight (6 layers × 6)
    figures = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert figures["perf/steps"] == 2 and figures["lora/adapter_bytes"] > 0
    assert (tmp_path / "lora_adapter" / "adapter_config.json").is_file()  # <WandbLogger.save_dir>/lora_adapter


def test_each_multirun_job_is_its_own_wandb_run_in_one_group(tmp_path):
    run_train(
        tmp_path, "model=tiny", "trainer.max_steps=2", "data.limit_val=32", "test=false", "seed=0,1", multirun=True
    )
    runs = [read_offline_run(d) for d in sorted(tmp_path.glob("*/wandb/offline-run-*"))]
    assert len(runs) == 2
    assert runs[0].run_id != runs[1].run_id
    assert runs[0].group == runs[1].group and runs[0].group.startswith("train@")
    assert ["seed=0" in r.name for r in runs] == [True, False] and "seed=1" in runs[1].name
    assert [r.config["seed"] for r in runs] == [0, 1]
    assert all(r.history["perf/steps"] == 2 for r in runs)
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2


def test_the_logged_hyperparameters_are_the_resolved_config_with_every_callback_option(tmp_path):
    run_train(tmp_path, "model=tiny", "logger=[csv,wandb]", "trainer.max_steps=2", "data.limit_val=32", "test=false")
    (hparams,) = tmp_path.glob("csv/version_*/hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    expected = OmegaConf.to_container(composed("model=tiny").lora)
    assert logged["lora"] == expected  # the composed node, whether the callback logs it too or not
    (wandb_run,) = tmp_path.glob("wandb/offline-run-*")
    assert read_offline_run(wandb_run).config["lora"] == expected
    assert logged["lora"]["merge_on_fit_end"] is True and logged["lora"]["adapter_dir"] is None
    assert logged["lora"]["r"] == 8 and logged["lora"]["log_analysis"] is True
    assert (
        logged["model"]["num_classes"] == 20
        and logged["model"]["encoder"]["_target_"] == "lightning_lora.task.tiny_bert"
    )
    assert {"data", "trainer", "callbacks", "logger", "paths", "seed"} <= set(logged)
    figures = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert figures["lora/trainable_params"] == 7828 and figures["lora/adapter_bytes"] > 0
    assert {"lora/total_params", "lora/trainable_ratio", "perf/steps", "perf/job_wall_s"} <= set(figures)


def test_a_config_tree_of_ones_own_runs_with_the_same_entry_point(tmp_path):
    tree = Path(__file__).parent / "user_conf"
    run_train(tmp_path, "--config-path", str(tree), "--config-name", "train")
    figures = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert figures["lora/trainable_params"] == 2 * (8 + 16)  # A and B of rank 2 on net.0 (8 -> 16) only
    (hparams,) = tmp_path.glob("csv/version_*/hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["lora"]["r"] == 2 and logged["lora"]["target_modules"] == ["net.0"]
    assert logged["model"] == {"_target_": "tests.user_conf.task.MLP", "features": 8, "num_classes": 4}
    assert (tmp_path / "csv" / "version_0" / "lora_adapter" / "adapter_model.safetensors").is_file()
