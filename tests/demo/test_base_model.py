import json
import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mixcpt.demo import base_model
from mixcpt.demo.base_model import MARKER, RECIPES, build_base_model
from mixcpt.demo.world import write_world

# The real quick recipe takes about half a minute; the tests check the mechanics on a smaller one.
TEST_RECIPE = replace(RECIPES["quick"], vocab_size=512, hidden=32, epochs=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    world = write_world(root / "world", seed=0, size="quick")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(RECIPES, "quick", TEST_RECIPE)
        out = build_base_model(world, root / "base", seed=0, size="quick")
    return world, out


def mean_nll(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_base_is_a_standard_hf_folder_with_a_chat_template(built):
    _, out = built
    assert (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == len(tokenizer)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|assistant|>\n")
    ids = tokenizer("Question: Who?\nAnswer: ", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_pretraining_lowers_the_loss_on_general_text(built):
    world, out = built
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model.config).eval()
    bios = [
        json.loads(line)["text"] for line in world.bench_general_ppl.read_text().splitlines()[:8]
    ]
    assert mean_nll(model, tokenizer, bios) < mean_nll(untrained, tokenizer, bios) - 1.0


def test_second_call_reuses_the_folder_and_another_world_rebuilds(built, tmp_path, monkeypatch):
    world, built_out = built
    out = shutil.copytree(built_out, tmp_path / "base")
    monkeypatch.setitem(RECIPES, "quick", TEST_RECIPE)
    weights, marker = (out / "model.safetensors").read_bytes(), (out / MARKER).read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("rebuilt although the cached base matches")

    with monkeypatch.context() as mp:
        mp.setattr(base_model, "Trainer", no_training)
        assert build_base_model(world, out, seed=0, size="quick") == out
    assert (out / MARKER).read_text() == marker

    other = write_world(tmp_path / "other", seed=1, size="quick")
    build_base_model(other, out, seed=0, size="quick")
    assert (out / MARKER).read_text() != marker and (
        out / "model.safetensors"
    ).read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base",
        "other",
    ]  # no temporary folder left
