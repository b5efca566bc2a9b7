"""The fused CPU kernel for the LSSD target: the same numbers as the eager path it replaces, built
once and reused, and a clean fallback where it cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from mixcpt.losses import logit_swap
from mixcpt.train import lssd_cpu_kernel
from mixcpt.train.fused_loss import StudentChunk, SwappedTeacher

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None, reason="no C compiler on this machine"
)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """`library()` rebuilt from an empty cache folder, and forgotten again afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lssd_cpu_kernel.library.cache_clear()
    yield lssd_cpu_kernel.library
    lssd_cpu_kernel.library.cache_clear()


def chunk_case(rows=64, V=8192, H=16, seed=0):
    """A realistic chunk: teacher logits from hidden states, rounded so the maximum ties (as bf16
    logits do), labels that are partly the teacher's top-1, the student's log p and its p."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, H, generator=g) @ torch.randn(V, H, generator=g).T).round()
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[::4] = z[::4].argmax(-1)
    log_p = F.log_softmax(torch.randn(rows, V, generator=g) * 2, -1)
    return z, log_p, labels


def eager_chunk(z, log_p, labels, q_scale, monkeypatch):
    grad = log_p.exp()
    with monkeypatch.context() as m:
        m.setattr(lssd_cpu_kernel, "applies", lambda *tensors: False)
        student = StudentChunk(log_p, grad, q_scale, labels)
        kl, matches = SwappedTeacher(z).chunk(student, z.clone(), temperature=1.0)
    return grad, kl, matches


@needs_compiler
def test_the_kernel_builds_here_and_is_what_float32_cpu_chunks_use():
    z, log_p, _ = chunk_case(rows=4, V=64)
    assert lssd_cpu_kernel.applies(z, log_p, log_p.exp())
    assert not lssd_cpu_kernel.applies(z.double(), log_p.double(), log_p.double())
    assert not lssd_cpu_kernel.applies(z.t(), log_p.t(), log_p.t())  # not contiguous


@needs_compiler
@pytest.mark.parametrize("V", [8192, 1000])  # 64-wide blocks, and a ragged last block
def test_kernel_matches_the_eager_path_and_a_float64_reference(V, monkeypatch):
    z, log_p, labels = chunk_case(V=V)
    grad = log_p.exp()
    kl, matches = lssd_cpu_kernel.swapped_target(z, log_p, grad, 0.7, labels)

    eager_grad, eager_kl, eager_matches = eager_chunk(z, log_p, labels, 0.7, monkeypatch)
    q64 = F.softmax(logit_swap(z.double(), labels), -1)
    kl64 = (q64 * (q64.log() - log_p.double())).sum()
    assert matches.item() == eager_matches.item() == (z.argmax(-1) == labels).sum().item() >= 16
    assert kl.item() == pytest.approx(kl64.item(), rel=1e-6)
    # The eager path sums the KL's terms in float32 over the whole chunk: 2e-5 to 5e-5 relative
    # error here, depending on the CPU's vector width (benchmarks/RESULTS.md, fourth pass).
    assert eager_kl.item() == pytest.approx(kl64.item(), rel=1e-4)
    torch.testing.assert_close(grad.double(), log_p.double().exp() - 0.7 * q64, atol=1e-7, rtol=0)
    torch.testing.assert_close(
        grad, eager_grad, atol=1e-5, rtol=0
    )  # the eager float32 passes round more


@needs_compiler
def test_kernel_passes_a_nan_logit_on_so_the_trainer_can_stop():
    z, log_p, labels = chunk_case(rows=4, V=256)
    z[2, 100] = float("nan")
    kl, _ = lssd_cpu_kernel.swapped_target(z, log_p, log_p.exp(), 1.0, labels)
    assert torch.isnan(kl)


@needs_compiler
def test_kernel_rejects_labels_outside_the_vocabulary_instead_of_writing_past_the_row():
    z, log_p, labels = chunk_case(rows=4, V=256)
    labels[1] = 256
    with pytest.raises(IndexError, match=r"\[0, 256\)"):
        lssd_cpu_kernel.swapped_target(z, log_p, log_p.exp(), 1.0, labels)


@needs_compiler
def test_kernel_is_built_once_into_the_cache_folder_and_reused(fresh_library):
    assert fresh_library() is not None
    built = list(lssd_cpu_kernel.cache_folder().glob("lssd_cpu_kernel-*.so"))
    assert len(built) == 1 and not [
        p for p in built[0].parent.iterdir() if p not in built
    ]  # no leftovers
    mtime = built[0].stat().st_mtime_ns
    lssd_cpu_kernel.library.cache_clear()
    assert fresh_library() is not None and built[0].stat().st_mtime_ns == mtime


def test_without_a_compiler_the_eager_path_is_used_with_one_warning(
    fresh_library, monkeypatch, caplog
):
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="mixcpt.train.lssd_cpu_kernel"):
        assert fresh_library() is None and fresh_library() is None
    assert len(caplog.records) == 1 and "eager" in caplog.text
    z, log_p, _ = chunk_case(rows=2, V=64)
    assert not lssd_cpu_kernel.applies(z, log_p, log_p.exp())


def test_a_failing_build_falls_back_to_the_eager_path_and_leaves_nothing_behind(
    fresh_library, monkeypatch, tmp_path, caplog
):
    fake = tmp_path / "cc"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo fake && exit 0\n'
        "echo 'error: broken' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.WARNING, logger="mixcpt.train.lssd_cpu_kernel"):
        assert fresh_library() is None
    assert "error: broken" in caplog.text
    assert not list(lssd_cpu_kernel.cache_folder().iterdir())


def test_the_kernel_can_be_turned_off(fresh_library, monkeypatch):
    monkeypatch.setenv("MIXCPT_CPU_KERNEL", "0")
    assert fresh_library() is None
    assert not list(lssd_cpu_kernel.cache_folder().glob("*"))
