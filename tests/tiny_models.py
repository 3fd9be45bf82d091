"""Tiny real models from configs (random weights, nothing downloaded) for the layer-type tests:
GPT-2 (transformers' Conv1D), a ResNet (nn.Conv2d), a diffusers UNet (nn.Conv2d), each with the
inputs it takes and a function returning the tensor the tests compare."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_lora import lora_parameters


@dataclass
class Case:
    """A model, a function of it returning the output to compare, and the conv targets in it."""

    model: nn.Module
    run: Callable[[nn.Module], Tensor]
    targets: list[str]


def gpt2(tie: bool = False, lm_head: bool = False) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tie,
    )  # fmt: skip
    model = (GPT2LMHeadModel if lm_head else GPT2Model)(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[1, -2:] = 0

    def run(m: nn.Module) -> Tensor:
        out = m(input_ids=ids)
        return out.logits if lm_head else out.last_hidden_state

    return Case(model, run, ["c_attn", "c_proj", "c_fc"])


def resnet() -> Case:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_channels=3)
    model = ResNetModel(config).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Case(model, lambda m: m(pixel_values=x).last_hidden_state, ["convolution"])


def unet() -> Case:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    timesteps = torch.tensor([1, 10])
    convs = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    return Case(model, lambda m: m(sample, timesteps, text).sample, convs)  # every nn.Conv2d in it


def randomize(model: nn.Module, std: float = 0.05) -> None:
    """Non-zero A and B of the size training gives (with B = 0 every adapter would look right).
    Works on PEFT models too (their ``lora_*`` parameters)."""
    g = torch.Generator().manual_seed(1)
    params = lora_parameters(model) or [p for n, p in model.named_parameters() if ".lora_" in n]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def types_and_keys(model: nn.Module) -> tuple[list[type], list[str]]:
    """The module types in order and the state-dict keys in order: what unloading must restore."""
    return [type(m) for m in model.modules()], list(model.state_dict())
