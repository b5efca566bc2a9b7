"""A run folder with a tiny stage-1 model and a small general pool, as the data and cpt stages
leave it."""

from __future__ import annotations

import json
import shutil

import pytest

from mixcpt.config import Config, TemplateConfig, config_from_dict
from mixcpt.data.render import render_messages
from mixcpt.rundir import RunDir

QA = [
    ("Where was Alice born?", "Paris"),
    ("What does Bob do?", "Bob works at Acme as an engineer."),
    ("What does the planet Zorbax orbit?", "The star Vega."),
    ("What is two plus two?", "four"),
    ("Which animal jumps over the lazy dog?", "The quick brown fox jumps over the lazy dog."),
    ("When was Alice born?", "Alice was born in Paris in 1970."),
    ("Count to five.", "1 2 3 4 5"),
    ("Name a star.", "Vega"),
]


def instruction_row(i: int, question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt, response = render_messages(messages, TemplateConfig())
    return {
        "id": f"i{i}",
        "source": "general",
        "messages": messages,
        "plain_prompt": prompt,
        "plain_response": response,
    }


def preference_row(i: int, question: str, chosen: str, rejected: str) -> dict:
    messages = [{"role": "user", "content": question}]
    prompt, _ = render_messages(
        [*messages, {"role": "assistant", "content": chosen}], TemplateConfig()
    )
    return {
        "id": f"p{i}",
        "source": "general",
        "messages": messages,
        "chosen": chosen,
        "rejected": rejected,
        "plain_prompt": prompt,
    }


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def pool_rows():
    """(instruction rows, preference rows); one empty instruction response, one identical
    preference pair."""
    instructions = [instruction_row(i, q, a) for i, (q, a) in enumerate(QA)]
    instructions.append(instruction_row(len(QA), "Say nothing.", ""))
    preferences = [preference_row(i, q, a, QA[(i + 3) % len(QA)][1]) for i, (q, a) in enumerate(QA)]
    preferences.append(preference_row(len(QA), "Where was Alice born?", "Paris", "Paris"))
    return instructions, preferences


@pytest.fixture
def make_cfg(tmp_path, tiny_model_dir):
    """make_cfg(select={...}, ...) -> Config of a tiny run; keyword sections update the
    defaults below."""
    return lambda **sections: tiny_config(tmp_path, tiny_model_dir, **sections)


def tiny_config(tmp_path, model_dir, **sections) -> Config:
    (tmp_path / "domain.txt").write_text("Zorbax orbits Vega.\n", encoding="utf-8")
    training = {
        "max_steps": 4,
        "per_device_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 2,
        "lr_scheduler": "constant",
    }
    data = {
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"domain": [{"path": "domain.txt"}]},
        "select": {"k": 3, "batch_size": 3, "max_length": 64},
        "sft": {"max_length": 64, "training": training},
        "dpo": {"max_length": 64, "beta": 0.5, "training": training},
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return config_from_dict(data, root=tmp_path)


@pytest.fixture
def run(tmp_path, tiny_model_dir, pool_rows):
    """A RunDir with data/pool/*.jsonl and the tiny model as both arms' cpt stage."""
    run = RunDir(tmp_path / "run")
    write_jsonl(run.data / "pool" / "instructions.jsonl", pool_rows[0])
    write_jsonl(run.data / "pool" / "preferences.jsonl", pool_rows[1])
    for arm in ("mixcpt", "baseline"):
        shutil.copytree(tiny_model_dir, run.stage(arm, "cpt"))
    return run


@pytest.fixture
def cfg(make_cfg):
    return make_cfg()
