"""The malloc settings of the training stages: chunk-sized temporaries reuse memory instead of
faulting in fresh pages each time, and the user can opt out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mixcpt.malloc_tuning import keep_freed_memory

# Steps of the chunked LSSD loss (8 MB [256, 8192] temporaries per chunk); prints the page faults
# per step in steady state: the fewest of three 3-step windows, since a heap that grows once more
# after the warm-up (seen: one 8 MB block in some runs) faults in fresh pages once, which is not
# what is measured.
STEPS = """
import resource, torch
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.targets import TeacherRows
from mixcpt.malloc_tuning import keep_freed_memory
keep_freed_memory()
g = torch.Generator().manual_seed(0)
hidden = torch.randn(4, 256, 64, generator=g, requires_grad=True)
weight = torch.randn(8192, 64, generator=g, requires_grad=True)
teacher = TeacherRows(torch.randn(4, 256, 64, generator=g), torch.randn(8192, 64, generator=g))
labels = torch.randint(0, 8192, (4, 256), generator=g)
def steps(n):
    for _ in range(n):
        cpt_loss(hidden, labels, teacher, weight).loss.backward()
steps(2)
windows = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(3)
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print(min(windows))
"""


def faults_per_step(**env: str) -> float:
    run = subprocess.run(
        [sys.executable, "-c", STEPS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return float(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_tuned_malloc_reuses_freed_temporaries_instead_of_faulting_in_fresh_pages():
    tuned, default = faults_per_step(), faults_per_step(MIXCPT_MALLOC_TUNING="0")
    # measured on the development machine: 0 tuned vs 8,500-13,000 with glibc's defaults
    # (14,000-19,000 on the eager path, MIXCPT_CPU_KERNEL=0, where tuned runs gave 0 and once 680)
    assert tuned < 0.1 * default, (tuned, default)


@pytest.mark.parametrize(
    "variable,value", [("MIXCPT_MALLOC_TUNING", "0"), ("MALLOC_TRIM_THRESHOLD_", "131072")]
)
def test_malloc_tuning_is_skipped_when_the_user_opts_out_or_set_malloc_themselves(
    monkeypatch, variable, value
):
    monkeypatch.setenv(variable, value)
    assert keep_freed_memory() is False
