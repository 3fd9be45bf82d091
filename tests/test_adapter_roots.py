"""Adapters trained inside a LightningModule load into the model they came from: files named
relative to the served Hugging Face model (its root), read by PEFT and by us in either form."""

import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRACallback,
    LoRATargetError,
    adapted_weights,
    inject_lora,
    load_adapter,
    save_adapter,
)
from lightning_lora.io import read_adapter
from lightning_lora.roots import default_adapter_root

from .hf_models import as_if_trained, ids, llama, logits

TARGETS = ["q_proj", "v_proj"]


class LitLM(L.LightningModule):
    """A LightningModule holding a Hugging Face causal LM under any attribute name."""

    def __init__(self, attribute="backbone", lm=None, head=False):
        super().__init__()
        self.attribute = attribute
        setattr(self, attribute, lm if lm is not None else llama())
        self.head = nn.Linear(32, 2) if head else None

    @property
    def lm(self):
        return getattr(self, self.attribute)

    def forward(self, tokens):
        return self.lm(input_ids=tokens).logits

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        out = self.lm(input_ids=tokens, labels=tokens)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def adapted(module=None, **config):
    module = module or LitLM()
    inject_lora(module, r=4, target_modules=TARGETS, **config)
    as_if_trained(module)
    return module


def test_the_default_root_is_the_hugging_face_model_inside_the_lightning_module():
    assert default_adapter_root(adapted(LitLM("net"))) == "net"
    nested = LitLM("stack", lm=nn.ModuleDict({"lm": llama()}))
    inject_lora(nested, r=4, target_modules=TARGETS)
    assert default_adapter_root(nested) == "stack.lm"


def test_there_is_no_default_root_for_a_bare_model_or_a_head_outside_it():
    bare = llama()
    inject_lora(bare, r=4, target_modules=TARGETS)
    assert default_adapter_root(bare) is None
    assert default_adapter_root(adapted(LitLM(head=True), trainable_modules=["head"])) is None


def test_peft_loads_a_root_relative_file_into_a_fresh_hugging_face_model(tmp_path):
    lit = adapted(LitLM("backbone"))
    save_adapter(lit, tmp_path, root="auto")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert read_adapter(tmp_path).extras["root"] == "backbone"
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids()), lit(ids()).detach(), rtol=0, atol=1e-5)


def test_train_in_lightning_then_serve_with_peft(tmp_path):
    lit = LitLM("whatever_name")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids(8, 12)), batch_size=4)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[LoRACallback(r=4, target_modules=TARGETS, init="gaussian", merge_on_fit_end=False)],
    )
    trainer.fit(lit, data)
    save_adapter(lit, tmp_path / "adapter", root="auto")  # what LoRACallback(adapter_root="auto") will write
    served = PeftModel.from_pretrained(llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(served, ids()), lit.eval()(ids()), rtol=0, atol=1e-5)


def test_we_load_either_form_into_either_model(tmp_path, recwarn):
    lit = adapted(LitLM("backbone"))
    expected = lit(ids()).detach()
    save_adapter(lit, tmp_path / "relative", root="backbone")
    save_adapter(lit, tmp_path / "full")

    bare = llama()
    load_adapter(bare, tmp_path / "relative")  # names as written
    torch.testing.assert_close(logits(bare, ids()), expected, rtol=0, atol=1e-5)
    wrapper = LitLM("backbone")
    load_adapter(wrapper, tmp_path / "relative")  # under the root recorded at save
    torch.testing.assert_close(wrapper(ids()).detach(), expected, rtol=0, atol=1e-5)
    assert not recwarn.list

    bare = llama()
    with pytest.warns(UserWarning, match=r"its names fit this LlamaForCausalLM without the prefix 'backbone\.'"):
        load_adapter(bare, tmp_path / "full")
    torch.testing.assert_close(logits(bare, ids()), expected, rtol=0, atol=1e-5)


def test_a_peft_file_of_the_bare_model_loads_into_the_wrapper(tmp_path):
    bare = llama()
    inject_lora(bare, r=4, target_modules=TARGETS)
    as_if_trained(bare)
    save_adapter(bare, tmp_path)
    wrapper = LitLM("net")
    with pytest.warns(UserWarning, match=r"its names fit this LitLM under the prefix 'net\.'"):
        load_adapter(wrapper, tmp_path)
    torch.testing.assert_close(wrapper(ids()).detach(), logits(bare, ids()), rtol=0, atol=1e-5)
    explicit = LitLM("net")
    load_adapter(explicit, tmp_path, root="net")  # no guessing
    assert [t.name for t in adapted_weights(explicit)] == [t.name for t in adapted_weights(wrapper)]


def test_a_file_that_fits_under_two_prefixes_asks_which(tmp_path):
    bare = llama()
    inject_lora(bare, r=4, target_modules=TARGETS)
    save_adapter(bare, tmp_path)
    twins = nn.ModuleDict({"a": llama(), "b": llama()})
    with pytest.raises(
        AdapterFileError,
        match=r"in several ways \(under the prefix 'a\.'; under the prefix 'b\.'\); say which with load_adapter\(model, path, root=\.\.\.\)",
    ):
        load_adapter(twins, tmp_path)
    assert not list(adapted_weights(twins))
    load_adapter(twins, tmp_path, root="b")
    assert next(adapted_weights(twins)).name.startswith("b.model.layers.0")


def test_a_file_that_fits_no_prefix_says_which_comes_closest(tmp_path):
    lit = adapted(LitLM("backbone"))
    save_adapter(lit, tmp_path)  # full names: backbone.model.layers.{0,1}...
    one_layer = llama()
    one_layer.model.layers = one_layer.model.layers[:1]
    with pytest.raises(
        AdapterFileError,
        match=r"Closest fit: without the prefix 'backbone\.', where 2 of 4 names fit \('backbone\.model\.layers\.1\.self_attn\.q_proj' does not\)",
    ):
        load_adapter(one_layer, tmp_path)
    assert not list(adapted_weights(one_layer))


def test_a_root_that_leaves_out_a_trained_module_is_refused(tmp_path):
    lit = adapted(LitLM("backbone", head=True), trainable_modules=["head"])
    with pytest.raises(
        LoRATargetError, match=r"trainable module 'head' lies outside root 'backbone'.*Save with root=None"
    ):
        save_adapter(lit, tmp_path, root="backbone")
    with pytest.raises(
        LoRATargetError, match=r"root='backbon': LitLM has no submodule of that name \(its children: backbone, head\)"
    ):
        save_adapter(lit, tmp_path, root="backbon")
    assert not (tmp_path / "adapter_config.json").exists()


def test_base_model_name_or_path_comes_from_the_hugging_face_config(tmp_path):
    llama().save_pretrained(tmp_path / "base")  # a local checkpoint: from_pretrained records its path
    from transformers import LlamaForCausalLM

    lit = adapted(LitLM("backbone", lm=LlamaForCausalLM.from_pretrained(tmp_path / "base")))
    save_adapter(lit, tmp_path / "adapter", root="auto")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_the_gathered_save_writes_root_relative_names_too(tmp_path):
    from lightning_lora.distributed import save_adapter_gathered

    lit = adapted(LitLM("backbone"))
    save_adapter_gathered(lit, lit, tmp_path, adapter_root="backbone")  # unsharded: save_adapter, same names
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids()), lit(ids()).detach(), rtol=0, atol=1e-5)
