"""Shared fixtures: a tiny tokenizer and tiny Llama models built from config, never downloaded."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mixcpt.demo.tokenizer import train_bpe_tokenizer  # noqa: E402

TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog. Alice was born in Paris in 1970.",
    "Bob works at Acme as an engineer. The planet Zorbax orbits the star Vega.",
    "### Instruction:\nWhere was Alice born?\n\n### Response:\nParis",
    "Question: what is two plus two? Answer: four. Numbers: 0 1 2 3 4 5 6 7 8 9.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with BOS/EOS/PAD and a chat template (about 400 tokens)."""
    return train_bpe_tokenizer(TINY_TEXT, vocab_size=400)


def build_tiny_llama(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, tied: bool = False
) -> LlamaForCausalLM:
    """A randomly initialised Llama of a few tens of thousands of parameters, deterministic for
    `seed`; `tied`: one tensor for the input and output embeddings."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,  # every max_length's default fits (mixcpt.checks)
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "deepspeed: runs DeepSpeed (skipped where not installed)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `deepspeed` skip, saying why, where DeepSpeed is not installed (it is in the
    dev extra, so CI runs them)."""
    if importlib.util.find_spec("deepspeed") is None:
        skip = pytest.mark.skip(reason="deepspeed not installed (pip install deepspeed)")
        for item in items:
            if "deepspeed" in item.keywords:
                item.add_marker(skip)


class Launcher:
    """A command run in fresh processes as a user runs it: each process with one thread (a
    launch's processes share the cores), no progress bars, offline, plus the variables given."""

    def __init__(self, *command: str):
        self.command = list(command)

    def env(self, **extra: str) -> dict[str, str]:
        """The launch's environment: this process's, one thread, no progress bars, offline, then
        `extra`."""
        quiet = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        return {**os.environ, **quiet, **extra}

    def __call__(self, *args, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """Run the command with `args` to the end; returns the finished process, its stdout and
        stderr as text."""
        return subprocess.run(
            [*self.command, *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env(**env),
            timeout=timeout,
        )

    def start(self, *args, **env: str) -> subprocess.Popen:
        """Start the command with `args` and return at once: stdout dropped, stderr a text
        pipe."""
        return subprocess.Popen(
            [*self.command, *map(str, args)],
            env=self.env(**env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="session")
def torchrun() -> Launcher:
    """Two CPU processes (gloo) under torchrun, as a user launches a run on two GPUs:
    `torchrun(SCRIPT or "-m", MODULE, *args, timeout=300, **env)` runs them to the end,
    `torchrun.start(...)` leaves them running (`Launcher`)."""
    python = sys.executable
    return Launcher(python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


@pytest.fixture(scope="session")
def mixcpt_cli() -> Launcher:
    """The `mixcpt` command in a process of its own: `mixcpt_cli(*argv, timeout=300, **env)`
    (`Launcher`)."""
    return Launcher(sys.executable, "-m", "mixcpt.cli")


@pytest.fixture(scope="session")
def make_tiny_llama():
    """`build_tiny_llama`, for a test that wants another vocabulary, seed, width, depth or tied
    embeddings, or several models."""
    return build_tiny_llama


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer, tiny_model):
    """A saved HF folder (safetensors + tokenizer) of the tiny model."""
    folder = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _ones(fraction: float, n: int) -> list[int]:
    """n per-item 0/1 scores whose mean is `fraction` (rounded to a whole item)."""
    k = round(fraction * n)
    return [1] * k + [0] * (n - k)


def _fake_row(arm: str, stage: str, cell: dict, base: dict, n: int) -> dict:
    dom, gen, kl = cell["domain"], cell["general"], cell.get("kl", 0.0)
    items = {
        "scores": {
            "dom": _ones(dom, n),
            "gen": _ones(gen, n),
            "ppl": {"sum": [1.5] * n, "count": [1] * n},
        },
        "chat_scores": {},
        "kl_to_base": {"sum": [kl * 10] * n, "count": [10] * n},
    }
    chat = {}
    if stage in ("sft", "dpo"):
        c_dom, c_gen = cell.get("chat_domain", dom), cell.get("chat_general", gen)
        items["chat_scores"] = {"dom": _ones(c_dom, n), "gen": _ones(c_gen, n)}
        chat = {"dom": {"acc_norm": c_dom}, "gen": {"exact_match": c_gen}}
    return {
        "arm": arm,
        "stage": stage,
        "status": "ok",
        "model": f"/run/{arm}/{stage}",
        "scores": {
            "dom": {"acc": dom, "acc_norm": dom},
            "gen": {"exact_match": gen, "contains": gen},
            "ppl": {"perplexity": 3.0, "bits_per_byte": 1.5},
        },
        "chat_scores": chat,
        "retention": {"kl_to_base": kl, "delta": {"gen": gen - base["general"], "ppl": 0.0}},
        "items": items,
    }


FAKE_BENCHMARKS = {
    "dom": {
        "kind": "multiple_choice",
        "tag": "domain",
        "main_metric": "acc_norm",
        "higher_is_better": True,
        "format": "plain",
        "chat_when_aligned": True,
    },
    "gen": {
        "kind": "generation",
        "tag": "general",
        "main_metric": "exact_match",
        "higher_is_better": True,
        "format": "plain",
        "chat_when_aligned": True,
    },
    "ppl": {
        "kind": "perplexity",
        "tag": "general",
        "main_metric": "bits_per_byte",
        "higher_is_better": False,
        "format": None,
        "chat_when_aligned": False,
    },
}


@pytest.fixture
def fake_eval_table():
    """A builder of results["eval"] as the eval stage writes it, with per-item scores:
    {(arm, stage): {"domain": p, "general": q, "kl": k, "chat_domain": ..., "chat_general": ...}}
    -> {"rows", "benchmarks"}; the ("base", "base") cell is required; every score is a fraction of
    `n` items (the first ones right)."""

    def build(cells: dict, n: int = 40) -> dict:
        base = cells[("base", "base")]
        rows = [_fake_row(arm, stage, cell, base, n) for (arm, stage), cell in cells.items()]
        return {"rows": rows, "benchmarks": FAKE_BENCHMARKS}

    return build
