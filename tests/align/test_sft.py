import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from mixcpt.align.sft import SFTTrainer, run_sft, sft_features
from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.errors import ConfigError
from mixcpt.models import load_model
from mixcpt.responses import pad_batch
from mixcpt.train import resumable


def test_sft_labels_mask_exactly_the_prompt(tiny_tokenizer, pool_rows):
    row = pool_rows[0][0]  # "Where was Alice born?" -> "Paris"
    (feat,) = sft_features([row], tiny_tokenizer, max_length=64, source="pool")
    prompt = tiny_tokenizer.apply_chat_template(
        row["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False).input_ids)

    assert feat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]
    assert tiny_tokenizer.decode(feat["input_ids"][:n_prompt]) == prompt
    assert tiny_tokenizer.decode(feat["input_ids"][n_prompt:]) == "Paris</s>\n"

    batch = pad_batch(
        [feat, {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6]}], tiny_tokenizer.pad_token_id
    )
    n = len(feat["input_ids"])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6] + [IGNORE_INDEX] * (n - 2)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (n - 2)
    assert batch["input_ids"][1, 2:].eq(tiny_tokenizer.pad_token_id).all()


def test_sft_keeps_the_response_of_a_too_long_prompt(tiny_tokenizer, pool_rows, caplog):
    row = {
        **pool_rows[0][1],
        "messages": [
            {"role": "user", "content": "Alice Bob Vega " * 40},
            pool_rows[0][1]["messages"][-1],
        ],
    }
    with caplog.at_level(logging.WARNING):
        (feat,) = sft_features([row], tiny_tokenizer, max_length=32, source="pool.jsonl")
    assert (
        "pool.jsonl: 1 of 1 prompts longer than max_length=32 were truncated from the left"
        in caplog.text
    )
    response = [t for t, label in zip(feat["input_ids"], feat["labels"]) if label != IGNORE_INDEX]
    assert len(feat["input_ids"]) == 32
    assert tiny_tokenizer.decode(response) == "Bob works at Acme as an engineer.</s>\n"


@pytest.mark.parametrize("arm", ["mixcpt", "baseline"])
def test_run_sft_writes_a_loadable_model_and_metrics(cfg, run, pool_rows, arm):
    selected = pool_rows[0][:3]
    run.selection("mixcpt").mkdir(parents=True)
    (run.selection("mixcpt") / "instructions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in selected)
    )

    metrics = run_sft(cfg, run, arm)

    folder = run.stage(arm, "sft")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert model.num_parameters() > 0
    assert metrics == run.read_results()["stages"][f"{arm}/sft"]
    assert metrics["steps"] == cfg.sft.training.max_steps and metrics["train_loss"] > 0
    assert metrics["n_samples"] == (
        3 if arm == "mixcpt" else 8
    )  # the pool's empty response is skipped
    assert any("loss" in entry for entry in metrics["log_history"])
    assert not run.work(arm, "sft").exists()
    assert run_sft(cfg, run, arm) == metrics  # done: skipped


def test_configured_chat_template_is_used_and_saved(make_cfg, run):
    cpt = run.stage("baseline", "cpt")
    config = json.loads((cpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (cpt / "tokenizer_config.json").write_text(json.dumps(config))
    (cpt / "chat_template.jinja").unlink(missing_ok=True)

    with pytest.raises(ConfigError, match="sft.chat_template"):
        run_sft(make_cfg(), run, "baseline")

    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    run_sft(
        make_cfg(sft={"chat_template": template, "training": {"max_steps": 1}}), run, "baseline"
    )
    assert AutoTokenizer.from_pretrained(run.stage("baseline", "sft")).chat_template == template


def test_rerun_resumes_from_the_last_checkpoint(cfg, run, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "mixcpt.train.resumable.save_trained_model", interrupted
    )  # killed after training, before saving
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, run, "baseline")
    assert not run.stage("baseline", "sft").exists()
    monkeypatch.undo()

    resumed_from, train = [], Trainer.train

    def spy(self, resume_from_checkpoint=None):
        resumed_from.append(resume_from_checkpoint)
        return train(self, resume_from_checkpoint=resume_from_checkpoint)

    monkeypatch.setattr(Trainer, "train", spy)
    metrics = run_sft(cfg, run, "baseline")
    assert resumed_from == [
        str(run.work("baseline", "sft") / f"checkpoint-{cfg.sft.training.max_steps}")
    ]
    assert metrics["steps"] == cfg.sft.training.max_steps
    assert run.stage("baseline", "sft").is_dir() and not run.work("baseline", "sft").exists()


def trained_update(make_cfg, run, monkeypatch, dtype: str) -> torch.Tensor:
    """w_end - w_start (every weight, flattened, float32) of 20 SFT steps at lr 1e-5 from the
    baseline arm's cpt model, taken from the trained model itself before it is saved."""
    ended = []
    save = resumable.save_trained_model

    def spy(trainer, *args, **kwargs):
        ended.append(torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()]))
        return save(trainer, *args, **kwargs)

    monkeypatch.setattr(resumable, "save_trained_model", spy)
    training = {"max_steps": 20, "learning_rate": 1e-5, "save_steps": 100}
    cfg = make_cfg(model={"dtype": dtype}, sft={"training": training})
    run_sft(cfg, run, "baseline", force=True)
    start = load_model(run.stage("baseline", "cpt"))
    return ended[0] - torch.cat([p.detach().flatten() for p in start.parameters()])


def test_bf16_sft_updates_the_weights_as_much_as_float32(make_cfg, run, monkeypatch):
    """bf16 keeps 8 significant bits: trained as bf16 weights, most steps of lr 1e-5 round to
    nothing. Float32 masters under bf16 autocast move as far as a float32 run."""
    start = run.stage("baseline", "cpt")
    # a bf16 checkpoint, so that both runs start from exactly the same weights
    load_model(start, "bfloat16").save_pretrained(start)
    float32 = trained_update(make_cfg, run, monkeypatch, "float32").norm().item()
    bfloat16 = trained_update(make_cfg, run, monkeypatch, "bfloat16").norm().item()
    assert bfloat16 == pytest.approx(float32, rel=0.1)


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_sft_loss_and_gradient_are_the_model_s_own(
    tiny_model, tiny_tokenizer, pool_rows, tmp_path, num_items_in_batch
):
    """`SFTTrainer`'s fused loss (the output layer on response positions only) has the value and
    the gradient of the model's own loss, which the plain Trainer would take."""
    rows = sft_features(pool_rows[0][:4], tiny_tokenizer, max_length=64, source="pool")
    batch = pad_batch(rows, tiny_tokenizer.pad_token_id)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    results = []
    for cls in (Trainer, SFTTrainer):
        model = copy.deepcopy(tiny_model).train()
        trainer = cls(model=model, args=args)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (own, own_grads), (fused, fused_grads) = results
    assert fused == pytest.approx(own, rel=1e-5)
    for a, b in zip(fused_grads, own_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
