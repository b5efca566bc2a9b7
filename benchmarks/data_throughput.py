"""Data-stage throughput: tokens per second (and per core) of `mixcpt data` on a generated corpus.

Prints one JSON line. Usage: python benchmarks/data_throughput.py [--mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mixcpt.config import config_from_dict
from mixcpt.data.stage import run_data
from mixcpt.demo.tokenizer import train_bpe_tokenizer
from mixcpt.rundir import RunDir


def generate(folder: Path, megabytes: float, seed: int = 0) -> None:
    """A domain corpus of about `megabytes` MB, plus instructions and preferences of a tenth
    of that."""
    rng = np.random.default_rng(seed)
    syllables = [
        "ka",
        "lo",
        "mi",
        "ren",
        "tor",
        "vex",
        "an",
        "ul",
        "ir",
        "os",
        "the",
        "of",
        "and",
        "is",
    ]
    vocab = np.array(["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(5000)])

    def sentence(n: int) -> str:
        return " ".join(rng.choice(vocab, n)) + "."

    with open(folder / "domain.jsonl", "w") as f:
        written = 0
        while written < megabytes * 1e6:
            line = (
                json.dumps({"text": " ".join(sentence(rng.integers(8, 20)) for _ in range(20))})
                + "\n"
            )
            written += f.write(line)
    with open(folder / "instructions.jsonl", "w") as f:
        for _ in range(int(megabytes * 400)):
            f.write(
                json.dumps({"instruction": sentence(12), "input": "", "output": sentence(30)})
                + "\n"
            )
    with open(folder / "preferences.jsonl", "w") as f:
        for _ in range(int(megabytes * 200)):
            f.write(
                json.dumps(
                    {"prompt": sentence(12), "chosen": sentence(30), "rejected": sentence(30)}
                )
                + "\n"
            )
    sample = [
        json.loads(line)["text"] for line, _ in zip(open(folder / "domain.jsonl"), range(2000))
    ]
    train_bpe_tokenizer(sample, vocab_size=8192).save_pretrained(folder / "tok")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0, help="size of the generated domain corpus")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate(folder, args.mb)
        cfg = config_from_dict(
            {
                "model": {"path": "tok"},
                "data": {
                    "domain": [{"path": "domain.jsonl", "weight": 0.8}],
                    "instructions": [{"path": "instructions.jsonl", "weight": 0.1}],
                    "preferences": [{"path": "preferences.jsonl", "weight": 0.1}],
                    "block_size": 1024,
                },
            },
            root=folder,
        )
        input_bytes = sum(p.stat().st_size for p in folder.glob("*.jsonl"))
        t0 = time.perf_counter()
        stats = run_data(cfg, RunDir(folder / "run"))
        seconds = time.perf_counter() - t0
    cores = len(os.sched_getaffinity(0))
    print(
        json.dumps(
            {
                "benchmark": "data_stage_throughput",
                "input_mb": round(input_bytes / 1e6, 1),
                "tokens": stats["available_tokens"],
                "seconds": round(seconds, 2),
                "tokens_per_second": round(stats["available_tokens"] / seconds),
                "tokens_per_second_per_core": round(stats["available_tokens"] / seconds / cores),
                "tokenize_tokens_per_second": stats["tokens_per_second"],
                "cores": cores,
            }
        )
    )


if __name__ == "__main__":
    main()
