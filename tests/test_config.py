"""LoRAConfig: defaults, validation at construction, and OmegaConf structured-config use."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from lightning_lora import LoRAConfig, LoRAConfigError


def test_defaults_follow_the_paper():
    config = LoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.init) == (8, 16.0, 0.0, "zeros_b")
    assert config.scaling == 2.0
    assert config.mha_projections == ["q", "k", "v"]
    assert config.target_modules == "all-linear"


def test_rslora_scales_by_square_root_of_rank():
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize("r", [0, -1, 4.0, "8", True, None])
def test_rank_must_be_a_positive_int(r):
    with pytest.raises(LoRAConfigError, match=r"LoRAConfig\.r must be a positive int"):
        LoRAConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -2.0, "16", float("nan"), float("inf")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(LoRAConfigError, match=r"LoRAConfig\.alpha must be a positive number"):
        LoRAConfig(alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1"])
def test_dropout_must_lie_in_zero_one(dropout):
    with pytest.raises(LoRAConfigError, match=r"LoRAConfig\.dropout must be a probability in \[0, 1\)"):
        LoRAConfig(dropout=dropout)


def test_unknown_init_names_the_choices_and_the_closest():
    with pytest.raises(LoRAConfigError, match=r"init='gausian'.*'zeros_b', 'gaussian'.*Did you mean 'gaussian'"):
        LoRAConfig(init="gausian")


def test_target_regex_that_does_not_compile_is_refused():
    with pytest.raises(LoRAConfigError, match="read as a regular expression"):
        LoRAConfig(target_modules="query(")


def test_empty_target_list_is_refused():
    with pytest.raises(LoRAConfigError, match="target_modules is empty"):
        LoRAConfig(target_modules=[])


@pytest.mark.parametrize("projections", [[], ["q", "x"], ["q", "q"]])
def test_mha_projections_must_be_a_subset_of_qkv(projections):
    with pytest.raises(LoRAConfigError, match="mha_projections"):
        LoRAConfig(mha_projections=projections)


def test_mha_projections_are_put_in_qkv_order():
    assert LoRAConfig(mha_projections=["v", "q"]).mha_projections == ["q", "v"]


def test_adapter_dtype_choices():
    assert LoRAConfig(adapter_dtype="float32").adapter_dtype == "float32"
    with pytest.raises(LoRAConfigError, match="adapter_dtype"):
        LoRAConfig(adapter_dtype="fp32")


def test_build_refuses_unknown_fields_and_suggests_the_right_one():
    with pytest.raises(LoRAConfigError, match=r"no field 'rank' \(did you mean 'r'\?\)"):
        LoRAConfig.build(rank=4)


def test_build_merges_mapping_and_keyword_overrides():
    config = LoRAConfig.build({"r": 2, "alpha": 4, "_target_": "ignored"}, alpha=8)
    assert (config.r, config.alpha) == (2, 8.0)


def test_works_as_an_omegaconf_structured_config():
    schema = OmegaConf.structured(LoRAConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["r=4", "target_modules=[query,value]"]))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, LoRAConfig)
    assert (config.r, config.target_modules) == (4, ["query", "value"])
    with pytest.raises(ConfigKeyError, match="rnak"):
        OmegaConf.merge(schema, {"rnak": 4})
    with pytest.raises(LoRAConfigError):
        OmegaConf.to_object(OmegaConf.merge(schema, {"r": 0}))
