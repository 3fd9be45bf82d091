"""The `lora` node's Hydra schema: generated from LoRAConfig and LoRACallback, so it cannot drift
from them, and checked at composition."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_lora import LoRACallback, LoRAConfig
from lightning_lora.callback import callback_options
from lightning_lora.hydra_config import LoRACallbackConf
from lightning_lora.train import CONF_DIR  # importing the entry point registers the schema

README = Path(__file__).resolve().parent.parent / "README.md"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def schema_defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(LoRACallbackConf))


def test_the_schema_is_lora_configs_fields_then_the_callbacks_keyword_options():
    keywords = [
        p.name for p in inspect.signature(LoRACallback.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    assert [f.name for f in dataclasses.fields(LoRACallbackConf)] == ["_target_", *keywords]
    assert keywords == [*LoRAConfig.field_names(), *callback_options()]
    defaults = schema_defaults()
    assert defaults["_target_"] == "lightning_lora.LoRACallback"
    assert {k: defaults[k] for k in LoRAConfig.field_names()} == LoRAConfig().to_dict()
    assert {k: defaults[k] for k in callback_options()} == {
        name: inspect.signature(LoRACallback.__init__).parameters[name].default for name in callback_options()
    }


def test_the_default_node_states_only_what_differs_from_the_schema():
    node = yaml.safe_load((CONF_DIR / "lora" / "default.yaml").read_text())
    assert node.pop("defaults") == ["schema", "_self_"]
    assert node == {"trainable_modules": ["head"], "log_analysis": True}
    composed_node = OmegaConf.to_container(composed().lora)
    assert composed_node == {**schema_defaults(), **node}


# One command-line value for every option; an option added to LoRACallback fails here until it has one.
OPTION_OVERRIDES = {
    "merge_on_fit_end": ("false", False),
    "adapter_dir": ("adapters/run1", "adapters/run1"),
    "optimizer": ("{_target_: torch.optim.SGD, _partial_: true, lr: 0.1}", None),
    "lr_scheduler": ("{_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 5}", None),
    "scheduler_interval": ("epoch", "epoch"),
    "loraplus_lr_ratio": ("16", 16.0),
    "adapter_name": ("task_a", "task_a"),
    "full_checkpoints": ("true", True),
    "log_analysis": ("false", False),
    "adapter_root": ("model", "model"),
    "overwrite": ("true", True),
    "log_rank_advice": ("true", True),
    "report_merge": ("false", False),
    "merge_probe": ("null", None),
}


def test_every_callback_option_composes_from_the_command_line_and_reaches_the_callback():
    assert set(OPTION_OVERRIDES) == set(callback_options())
    cfg = composed(*(f"lora.{name}={value}" for name, (value, _) in OPTION_OVERRIDES.items()))
    callback = instantiate(cfg.lora)
    for name, (_, expected) in OPTION_OVERRIDES.items():
        if expected is not None:
            assert getattr(callback, name) == expected, name
    assert callback.optimizer.keywords == {"lr": 0.1} and callback.lr_scheduler.keywords == {"step_size": 5}


@pytest.mark.parametrize(("override", "key"), [("lora.r=abc", "lora.r"), ("lora.use_rslora=maybe", "lora.use_rslora")])
def test_a_value_of_the_wrong_type_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException, match=re.escape(override)) as err:
        composed(override)
    assert f"full_key: {key}" in str(err.value.__cause__)


def readme_reference_table() -> dict[str, object]:
    """``name -> default`` of the README's configuration reference, defaults read as YAML."""
    section = README.read_text().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.MULTILINE)
    return {name: yaml.safe_load(default) for name, default in rows}


def test_the_readme_reference_lists_every_field_and_option_with_its_default():
    expected = {k: v for k, v in schema_defaults().items() if k != "_target_"}
    assert readme_reference_table() == expected


def test_two_runs_started_in_the_same_second_get_their_own_output_directories():
    """Hydra #1607: the default `${now:%Y-%m-%d_%H-%M-%S}` gives two jobs started in one second
    one directory (and one Lightning log_dir, one adapter_dir). Ours carries microseconds."""
    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True)
            dirs.append((OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.dir")))
    (run_a, sweep_a), (run_b, sweep_b) = dirs
    assert run_a != run_b and sweep_a != sweep_b
    assert all(re.fullmatch(r".*/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", d) for d in (run_a, run_b, sweep_a))
