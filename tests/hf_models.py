"""Real Hugging Face models built from tiny configs (random weights, no download), shared by the
tests of real-model behaviour. Two layers, width 32: each builds in milliseconds."""

import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PvtV2Config,
    PvtV2Model,
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
)

transformers.logging.set_verbosity_error()

VOCAB = 100


def llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5ForConditionalGeneration(config).eval()


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return BertModel(config).eval()


def pvt(seed: int = 0) -> PvtV2Model:
    """A vision transformer whose patch embedding (``Conv2d``) and attention output (``Linear``)
    are both named ``proj``: transformers' counterpart of timm's ViT naming."""
    torch.manual_seed(seed)
    config = PvtV2Config(
        hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2]
    )
    return PvtV2Model(config).eval()


def resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a causal LM or of T5 (decoder fed the same tokens)."""
    with torch.no_grad():
        if isinstance(model, T5ForConditionalGeneration) or isinstance(
            getattr(model, "base_model", None), T5ForConditionalGeneration
        ):
            return model(input_ids=tokens, decoder_input_ids=tokens).logits
        return model(input_ids=tokens).logits


def as_if_trained(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Non-zero A and B of trained size (works on PEFT models too): with B = 0 every merge,
    file and copy would look right."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A" in name or ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class MHANet(nn.Module):
    """Two ``nn.MultiheadAttention`` called directly (PEFT's MHA layer wraps ``forward``, so it
    must be called; ``nn.TransformerEncoderLayer``'s inference fast path would bypass it)."""

    def __init__(self, d: int = 32, seed: int = 0, kdim: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.cross = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x[..., : self.attn.kdim]  # keys and values of width kdim (= d unless given)
        h = self.attn(x, kv, kv, need_weights=False)[0]
        h = self.cross(h, x, x, need_weights=False)[0]
        return self.head(h)
