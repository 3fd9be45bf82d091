"""LoRA+ (Hayou et al. 2024): B learns `ratio ×` faster than A, in the user's own optimizer,
its schedulers kept in step; the same training as PEFT's create_loraplus_optimizer."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torch import nn

from lightning_lora import LoRACallback, LoRAConfig, LoRAConfigError, LoRAStateError, apply_loraplus, inject_lora
from lightning_lora.loraplus import lora_b_parameters
from tests.test_callback import MLP, csv_metrics, loader, trainer


def mlp_with_lora() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0", "2"], trainable_modules=["4"]))
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_b_moves_to_a_named_group_with_ratio_times_the_lr_and_the_rest_is_kept():
    model = mlp_with_lora()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9))
    names = apply_loraplus(optimizer, model, 16)
    assert type(optimizer) is torch.optim.AdamW and names == ["pg1.lora_B"]
    first, b_group = optimizer.param_groups
    assert {id(p) for p in b_group["params"]} == lora_b_parameters(model)
    assert not lora_b_parameters(model) & {id(p) for p in first["params"]}  # A and the head stay
    assert len(first["params"]) + len(b_group["params"]) == len(trainable(model))
    assert first["lr"] == 1e-3 and b_group["lr"] == pytest.approx(16e-3)
    assert b_group["weight_decay"] == 0.1 and b_group["betas"] == (0.8, 0.9)


def test_named_groups_keep_their_names_and_a_b_only_group_is_scaled_in_place():
    model = mlp_with_lora()
    b_ids = lora_b_parameters(model)
    b = [p for p in trainable(model) if id(p) in b_ids]
    rest = [p for p in trainable(model) if id(p) not in b_ids]
    optimizer = torch.optim.SGD([{"params": rest, "name": "body"}, {"params": b, "lr": 0.5}], lr=0.1)
    assert apply_loraplus(optimizer, model, 4) == ["pg2"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 2.0]
    optimizer = torch.optim.SGD([{"params": trainable(model), "name": "body"}], lr=0.1)
    assert apply_loraplus(optimizer, model, 4) == ["body.lora_B"]


def peft_pair():
    """A tiny Llama as PEFT wraps it and the same weights with our adapters."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    ours = copy.deepcopy(base)
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:  # model.layers.0.self_attn.q_proj.lora_A.default
                p.copy_(their_params[f"base_model.model.{name}.weight"])
    return ours, theirs


def test_training_equals_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs = peft_pair()
    optimizer = torch.optim.AdamW(trainable(ours), lr=1e-3, weight_decay=0.01)
    apply_loraplus(optimizer, ours, 16)
    their_optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.01
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for model, opt in ((ours, optimizer), (theirs, their_optimizer)):
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    their_params = dict(theirs.named_parameters())
    b_moved = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:  # Adam's first steps amplify fp rounding of the gradients: ~1e-5 here
            torch.testing.assert_close(p, their_params[f"base_model.model.{name}.weight"], rtol=1e-4, atol=5e-5)
            b_moved = max(b_moved, p.abs().max().item()) if ".lora_B." in name else b_moved
    assert b_moved > 0.03  # 4 Adam steps at 16 × 1e-3: a ratio of 8 would be 0.03 off


def schedulers(optimizer):
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return {
        "LambdaLR": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
        "OneCycleLR": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20),
        "SequentialLR": torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[3]),
    }


@pytest.mark.parametrize("kind", ["LambdaLR", "OneCycleLR", "SequentialLR"])
def test_schedulers_built_before_drive_the_b_group_at_ratio_times_the_schedule(kind):
    model = mlp_with_lora()
    optimizer = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    scheduler = schedulers(optimizer)[kind]
    apply_loraplus(optimizer, model, 8, [scheduler])
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        a_lr, b_lr = (g["lr"] for g in optimizer.param_groups)
        assert b_lr == pytest.approx(8 * a_lr) and a_lr > 0
    assert scheduler.get_last_lr()[1] == pytest.approx(8 * scheduler.get_last_lr()[0])


def test_bad_ratios_and_misuse_are_refused_with_the_fix():
    for ratio in (0.5, True, "16", float("inf")):
        with pytest.raises(LoRAConfigError, match="loraplus_lr_ratio must be a number >= 1"):
            LoRACallback(target_modules=["net.0"], loraplus_lr_ratio=ratio)
    model = mlp_with_lora()
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    apply_loraplus(optimizer, model, 2)
    before = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(LoRAStateError, match="already applied"):
        apply_loraplus(optimizer, model, 2)
    assert [dict(g) for g in optimizer.param_groups] == before  # a refused operation changes nothing
    with pytest.raises(LoRAStateError, match="no LoRA B matrix"):
        apply_loraplus(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), nn.Linear(2, 2), 2)


class ScheduledMLP(MLP):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_callback_splits_the_module_optimizer_and_learning_rate_monitor_logs_the_groups(tmp_path):
    torch.manual_seed(0)
    module = ScheduledMLP()
    callback = LoRACallback(
        target_modules=["net.0", "net.2"], trainable_modules=["head"], loraplus_lr_ratio=16, merge_on_fit_end=False
    )
    fit = trainer(tmp_path, [callback, LearningRateMonitor("step")], log_every_n_steps=1)
    fit.fit(module, loader())
    (optimizer,) = fit.optimizers
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[1]["name"] == "pg1.lora_B"
    rows = [r for r in csv_metrics(tmp_path / "logs" / "run" / "version_0") if r.get("lr-AdamW/pg1.lora_B")]
    assert len(rows) == 6
    for row in rows:
        assert float(row["lr-AdamW/pg1.lora_B"]) == pytest.approx(16 * float(row["lr-AdamW/pg1"]))
    assert float(rows[-1]["lr-AdamW/pg1"]) < float(rows[0]["lr-AdamW/pg1"])  # the schedule ran on both


def test_the_callbacks_optimizer_factory_gets_the_groups_before_its_scheduler_is_built(tmp_path):
    from functools import partial

    torch.manual_seed(0)
    callback = LoRACallback(
        target_modules=["net.0"], trainable_modules=["head"], loraplus_lr_ratio=4, merge_on_fit_end=False,
        optimizer=partial(torch.optim.SGD, lr=0.1), lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )  # fmt: skip
    fit = trainer(tmp_path, [callback])
    fit.fit(MLP(), loader())
    a_group, b_group = fit.optimizers[0].param_groups
    assert b_group["lr"] == pytest.approx(4 * a_group["lr"]) and a_group["lr"] < 0.1  # stepped 3 times


def test_resume_from_a_checkpoint_keeps_the_groups_and_their_state(tmp_path):
    torch.manual_seed(0)
    kwargs = {"target_modules": ["net.0", "net.2"], "trainable_modules": ["head"], "loraplus_lr_ratio": 16}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path, [LoRACallback(merge_on_fit_end=False, **kwargs), checkpoint], max_steps=4, enable_checkpointing=True
    )
    first.fit(ScheduledMLP(), loader())
    saved = first.optimizers[0].state_dict()
    torch.manual_seed(0)
    second = trainer(tmp_path / "b", [LoRACallback(merge_on_fit_end=False, **kwargs)], max_steps=4)
    second.fit(ScheduledMLP(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # resumes at step 4: no step
    restored = second.optimizers[0]
    assert [g["name"] for g in restored.param_groups if "name" in g] == ["pg1.lora_B"]
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in saved["param_groups"]]
    assert len(restored.state) == len(saved["state"]) > 0


def test_hydra_node_sets_the_ratio():
    from hydra.utils import instantiate

    from tests.test_hydra_config import composed

    cfg = composed("lora.loraplus_lr_ratio=16")
    assert instantiate(cfg.lora).loraplus_lr_ratio == 16.0
