"""Safety defaults against hostile model folders: no remote code unless the config allows it, and no
pickled weights ever unpickled (safetensors only)."""

from __future__ import annotations

import json
import pickle

import pytest

from mixcpt.config import ModelConfig
from mixcpt.errors import ConfigError
from mixcpt.models import load_model


class WritesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what a malicious checkpoint does: run code at load time
        return (open, (self.marker, "w"))


def test_trust_remote_code_is_off_unless_the_config_sets_it(tmp_path, tiny_model_dir):
    assert ModelConfig(path="m").trust_remote_code is False
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["model_type"] = (
        "evil-llm"  # not a built-in architecture: only the folder's code could load it
    )
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_model(folder)
    assert not marker.exists()


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model_dir):
    marker = tmp_path / "pickle-ran"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": WritesMarkerWhenUnpickled(marker)}, f)
    with pytest.raises(ConfigError, match="safetensors"):
        load_model(folder)
    assert not marker.exists()
