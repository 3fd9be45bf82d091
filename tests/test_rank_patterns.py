"""Per-weight ranks and alphas (PEFT's rank_pattern / alpha_pattern): trained from a config,
matched as PEFT matches them, saved and loaded both ways with equal outputs."""

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_lora import LoRAConfig, LoRAConfigError, inject_lora, load_adapter, parameter_stats, save_adapter
from lightning_lora.hydra_config import register_configs
from lightning_lora.state import adapted_weights
from lightning_lora.train import CONF_DIR

from .hf_models import llama

peft = pytest.importorskip("peft")

PATTERNS = {"rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, "alpha_pattern": {"o_proj": 32.0}}
TARGETS = ["q_proj", "v_proj", "o_proj"]


def ranks_and_scales(model):
    return {t.name: (t.layer.specs["default"].r, t.layer.specs["default"].scale) for t in adapted_weights(model)}


def randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in adapted_weights(model):
            t.layer.lora_B["default"].copy_(torch.randn(t.layer.lora_B["default"].shape, generator=g) * 0.1)


def test_patterns_give_the_ranks_and_alphas_peft_gives():
    ours = llama()
    inject_lora(ours, r=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    theirs = peft.get_peft_model(
        llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **PATTERNS)
    ).base_model.model
    for name, (r, scale) in ranks_and_scales(ours).items():
        module = theirs.get_submodule(name)
        assert module.r["default"] == r and module.scaling["default"] == pytest.approx(scale), name
    assert ranks_and_scales(ours)["model.layers.0.self_attn.q_proj"] == (4, 2.0)
    assert ranks_and_scales(ours)["model.layers.1.self_attn.q_proj"] == (6, 8 / 6)
    assert ranks_and_scales(ours)["model.layers.0.self_attn.v_proj"] == (2, 4.0)
    assert ranks_and_scales(ours)["model.layers.0.self_attn.o_proj"] == (4, 8.0)


def test_a_pattern_trained_adapter_round_trips_through_peft(tmp_path):
    ours = llama()
    inject_lora(ours, r=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
        back = llama()
        load_adapter(back, tmp_path / "theirs")
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_parameter_table_shows_per_weight_ranks():
    model = llama()
    inject_lora(model, r=4, target_modules=TARGETS, **PATTERNS)
    stats = parameter_stats(model)
    assert {m.name: m.r for m in stats.modules}["model.layers.0.self_attn.v_proj"] == 2
    assert re.search(r"self_attn\.v_proj\s+×2\s+\S+\s+2\s", stats.table())
    assert re.search(r"self_attn\.q_proj\s+32×32\s+6\s", stats.table())  # layer 1's q_proj: its own row


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank_pattern": {"v_proj": 0}}, r"LoRAConfig\.rank_pattern must be a positive int"),
        ({"rank_pattern": ["v_proj"]}, r"LoRAConfig\.rank_pattern must map module names or patterns to values"),
        ({"alpha_pattern": {"(a+)+$": 2.0}}, r"LoRAConfig\.alpha_pattern key '\(a\+\)\+\$': .*repeated group"),
    ],
)
def test_bad_patterns_fail_at_construction(fields, match):
    with pytest.raises(LoRAConfigError, match=match):
        LoRAConfig(**fields)


def test_a_rank_pattern_composes_from_the_command_line():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["lora.rank_pattern={value:2}", "lora.alpha_pattern={query:4}"])
    callback = instantiate(cfg.lora)
    assert callback.config.rank_pattern == {"value": 2} and callback.config.alpha_pattern == {"query": 4.0}
