"""Each benchmark script runs at a tiny size and prints one line of valid JSON with its ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TINY_MODEL = [
    "--vocab",
    "256",
    "--hidden",
    "16",
    "--intermediate",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--batch",
    "2",
    "--seq",
    "16",
    "--steps",
    "1",
    "--warmup",
    "0",
]


@pytest.mark.parametrize(
    "script,args,ratios",
    [
        (
            "lssd_step.py",
            [*TINY_MODEL, "--top-k", "4"],
            [
                "online_over_plain",
                "online_kl_over_online",
                "online_mft_over_online",
                "cache_over_plain",
                "lora_over_lora_plain",
                "plain_over_hf_ce",
            ],
        ),
        ("vs_trl.py", TINY_MODEL, ["ours_over_trl"]),
        (
            "lssd_memory.py",
            ["--vocab", "512", "--tokens", "32", "--hidden", "8", "--chunk", "8"],
            ["chunked_over_naive"],
        ),
    ],
)
def test_benchmark_prints_one_json_line_of_positive_ratios(script, args, ratios):
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert all(figures[name] > 0 for name in ratios)


def test_stage_floors_prints_one_json_line_per_stage_with_its_ratio():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "stage_floors.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    stages = ["data", "cache", "select", "mc", "ppl", "generate", "sft", "dpo"]
    assert [figures["stage"] for figures in lines] == stages
    assert all(figures["ratio"] > 0 and figures["cpu_ratio"] > 0 for figures in lines)


def test_plan_vs_measured_prints_predicted_and_measured(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "plan_vs_measured.py"),
            "--models",
            "quickstart",
            "--stages",
            "cpt/baseline",
            "--steps",
            "1",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[0])
    assert row["predicted_mib"] > 0 and row["predicted/rss"] > 0 and row["predicted/live"] > 0
