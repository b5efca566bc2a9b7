"""Saving a trained model: float32 masters written in `model.dtype`, LoRA merged in float32."""

from __future__ import annotations

import copy
import json

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

from mixcpt.models import save_trained_model


def trainer_of(model: torch.nn.Module, tmp_path) -> Trainer:
    return Trainer(model=model, args=TrainingArguments(str(tmp_path / "work"), report_to=[]))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_float32_weights_are_saved_in_model_dtype(tmp_path, tiny_tokenizer, tiny_model):
    config = copy.deepcopy(tiny_model.config)
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    save_trained_model(trainer_of(tied, tmp_path), tiny_tokenizer, tmp_path / "out", "bfloat16")

    saved = saved_tensors(tmp_path / "out")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in saved  # a tied weight is written once, as from a bf16 model
    for name, tensor in saved.items():
        assert torch.equal(tensor, tied.state_dict()[name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, saved["model.embed_tokens.weight"])
    assert tied.dtype == torch.float32  # the trained model itself is left as it was


def test_lora_adapters_merge_in_float32_then_cast(tmp_path, tiny_tokenizer, tiny_model):
    base = tiny_model.to(torch.bfloat16)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():  # adapters that learned a small change, as after a few steps
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    layer = student.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's float32 adapters
    delta = layer.get_delta_weight("default").float()  # [out, in]
    expected = (layer.base_layer.weight.float() + delta).to(torch.bfloat16)
    save_trained_model(
        trainer_of(student, tmp_path), tiny_tokenizer, tmp_path / "out", "bfloat16", merge_lora=True
    )

    saved = saved_tensors(tmp_path / "out")
    assert not any("lora" in name for name in saved)
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], expected)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
