"""Fixtures for the data stage: small source files in every supported form, and a config for
them."""

from __future__ import annotations

import json

import pytest

from mixcpt.config import config_from_dict


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tok_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def sources(tmp_path):
    """A domain jsonl, an Alpaca + chat instruction file, a preference file (strings and
    messages)."""
    domain = write_jsonl(
        tmp_path / "domain.jsonl",
        [
            {"text": f"The planet P{i} orbits the star S{i % 7} and has {i % 5} moons."}
            for i in range(200)
        ],
    )
    instructions = write_jsonl(
        tmp_path / "instructions.jsonl",
        [
            *(
                {"instruction": f"What is {i} plus 1?", "input": "", "output": str(i + 1)}
                for i in range(60)
            ),
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
        ],
    )
    preferences = write_jsonl(
        tmp_path / "preferences.jsonl",
        [
            *(
                {
                    "prompt": f"Is {i} even?",
                    "chosen": "yes" if i % 2 == 0 else "no",
                    "rejected": "maybe",
                }
                for i in range(40)
            ),
            {
                "prompt": [{"role": "user", "content": "Capital of France?"}],
                "chosen": [{"role": "assistant", "content": "Paris"}],
                "rejected": "Rome",
            },
        ],
    )
    return {"domain": domain, "instructions": instructions, "preferences": preferences}


@pytest.fixture
def make_config(tmp_path, tok_dir, sources):
    """make_config(**data_overrides) -> Config over the `sources` files."""

    def make(weights=(0.5, 0.3, 0.2), **data):
        raw = {
            "model": {"path": str(tok_dir)},
            "data": {
                "domain": [{"path": str(sources["domain"]), "weight": weights[0]}],
                "instructions": [{"path": str(sources["instructions"]), "weight": weights[1]}],
                "preferences": [{"path": str(sources["preferences"]), "weight": weights[2]}],
                "block_size": 32,
                **data,
            },
        }
        return config_from_dict(raw, root=tmp_path)

    return make
