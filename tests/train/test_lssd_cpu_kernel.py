"""The fused CPU kernels (the LSSD target, the teacher cache's top-k): the same numbers as the
eager paths they replace, built once and reused, and a clean fallback where they cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from mixcpt.losses import logit_swap, mft_target
from mixcpt.train import lssd_cpu_kernel
from mixcpt.train.targets import Correction, StudentChunk, TeacherRows
from mixcpt.train.teacher_cache import top_k_logprobs

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


def eager_chunk(z, log_p, labels, q_scale, monkeypatch, objective="lssd"):
    grad = log_p.exp()
    with monkeypatch.context() as m:
        m.setattr(lssd_cpu_kernel, "applies", lambda *tensors: False)
        student = StudentChunk(log_p, grad, q_scale, labels)
        sums = TeacherRows(z).chunk(student, z.clone(), 1.0, Correction(objective))
    return grad, *sums


def target64(objective, z, labels):
    """The objective's q [c, V] from teacher logits z [c, V], in float64 (`mixcpt.losses`)."""
    if objective == "lssd":
        return F.softmax(logit_swap(z.double(), labels), -1)
    t = F.softmax(z.double(), -1)
    return t if objective == "kl" else mft_target(t, labels, 0.2)


@needs_compiler
def test_the_kernel_builds_here_and_is_what_float32_cpu_chunks_use():
    z, log_p, _ = chunk_case(rows=4, V=64)
    assert lssd_cpu_kernel.applies(z, log_p, log_p.exp())
    assert not lssd_cpu_kernel.applies(z.double(), log_p.double(), log_p.double())
    assert not lssd_cpu_kernel.applies(z.t(), log_p.t(), log_p.t())  # not contiguous


@needs_compiler
@pytest.mark.parametrize("objective", ["lssd", "kl", "mft"])
@pytest.mark.parametrize("V", [8192, 1000])  # 64-wide blocks, and a ragged last block
def test_kernel_matches_the_eager_path_and_a_float64_reference(V, objective, monkeypatch):
    z, log_p, labels = chunk_case(V=V)
    grad = log_p.exp()
    kl, kl_base, matches = lssd_cpu_kernel.teacher_target(z, log_p, grad, 0.7, labels, objective)

    eager_grad, eager_kl, eager_base, eager_matches = eager_chunk(
        z, log_p, labels, 0.7, monkeypatch, objective
    )
    q64, t64 = target64(objective, z, labels), F.softmax(z.double(), -1)
    kl64 = (torch.xlogy(q64, q64) - q64 * log_p.double()).sum()
    base64 = (torch.xlogy(t64, t64) - t64 * log_p.double()).sum()
    assert matches.item() == eager_matches.item() == (z.argmax(-1) == labels).sum().item() >= 16
    assert kl.item() == pytest.approx(kl64.item(), rel=1e-6)
    assert kl_base.item() == pytest.approx(base64.item(), rel=1e-6)
    # The eager path sums the KL's terms in float32 over the whole chunk: 2e-5 to 5e-5 relative
    # error here, depending on the CPU's vector width (benchmarks/RESULTS.md, fourth pass).
    assert eager_kl.item() == pytest.approx(kl64.item(), rel=1e-4)
    assert eager_base.item() == pytest.approx(base64.item(), rel=1e-4)
    torch.testing.assert_close(grad.double(), log_p.double().exp() - 0.7 * q64, atol=1e-7, rtol=0)
    torch.testing.assert_close(
        grad, eager_grad, atol=1e-5, rtol=0
    )  # the eager float32 passes round more


@needs_compiler
def test_kernel_passes_a_nan_logit_on_so_the_trainer_can_stop():
    z, log_p, labels = chunk_case(rows=4, V=256)
    z[2, 100] = float("nan")
    kl, _, _ = lssd_cpu_kernel.teacher_target(z, log_p, log_p.exp(), 1.0, labels)
    assert torch.isnan(kl)


@needs_compiler
def test_kernel_rejects_labels_outside_the_vocabulary_instead_of_writing_past_the_row():
    z, log_p, labels = chunk_case(rows=4, V=256)
    labels[1] = 256
    with pytest.raises(IndexError, match=r"\[0, 256\)"):
        lssd_cpu_kernel.teacher_target(z, log_p, log_p.exp(), 1.0, labels)


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


def reference_top_k(z: torch.Tensor, k: int):
    """float64 log-softmax; top k by value, ties by lower index (a stable sort); the exact log of
    the rest's mass."""
    log_q = z.double().log_softmax(-1)
    order = torch.sort(-log_q, dim=-1, stable=True).indices[:, :k]
    tail = log_q.scatter(-1, order, float("-inf")).logsumexp(-1)
    return log_q.gather(-1, order), order, tail


@needs_compiler
@pytest.mark.parametrize(
    "V,k,scale,rounded",
    [
        (8192, 64, 1.0, False),  # the cache's usual case
        (1000, 5, 30.0, False),  # a ragged last group; peaked: tails near e^-250
        (8192, 64, 3.0, True),  # many ties, inside the top k and across its edge
        (37, 36, 1.0, False),  # k = V - 1; fewer groups than k + 1
        (40, 1, 1.0, True),
    ],
)
def test_teacher_top_k_matches_a_float64_reference(V, k, scale, rounded):
    g = torch.Generator().manual_seed(V + k)
    z = (torch.randn(64, 16, generator=g) @ torch.randn(V, 16, generator=g).T) * scale
    z = z.round() if rounded else z
    values, ids, tail = lssd_cpu_kernel.teacher_top_k(z, k)
    ref_values, ref_ids, ref_tail = reference_top_k(z, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(tail.double(), ref_tail, atol=1e-5, rtol=1e-6)


@needs_compiler
def test_teacher_top_k_with_masked_logits_and_a_nan():
    z = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    z[0, 10:] = float("-inf")  # 10 finite logits: the top 5 and a tail of 5
    z[1, :] = float("-inf")
    z[1, 3] = 0.0  # one finite logit: the rest of the top k and the tail have no mass
    z[2, 50] = float("nan")
    values, ids, tail = lssd_cpu_kernel.teacher_top_k(z, 5)
    ref_values, ref_ids, ref_tail = reference_top_k(z[:1], 5)
    assert torch.equal(ids[0], ref_ids[0])
    torch.testing.assert_close(values[0].double(), ref_values[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(tail[0].double(), ref_tail[0], atol=1e-6, rtol=0)
    assert ids[1, 0] == 3 and values[1, 0] == 0 and torch.isneginf(values[1, 1:]).all()
    assert torch.isneginf(tail[1])
    assert torch.isnan(values[2]).all() and torch.isnan(tail[2])  # as the eager logsumexp


@needs_compiler
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_cache_top_k_takes_the_kernel_on_the_cpu_and_agrees_with_the_eager_path(
    temperature, monkeypatch
):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 16, generator=g), torch.randn(4096, 16, generator=g)
    calls = []
    kernel = lssd_cpu_kernel.teacher_top_k
    monkeypatch.setattr(
        lssd_cpu_kernel, "teacher_top_k", lambda z, k: calls.append(z.shape) or kernel(z, k)
    )
    fused = top_k_logprobs(hidden, weight, 64, temperature, chunk_size=128)
    assert calls == [(128, 4096), (128, 4096), (44, 4096)]
    monkeypatch.setattr(lssd_cpu_kernel, "top_k_applies", lambda z, k: False)
    eager = top_k_logprobs(hidden, weight, 64, temperature, chunk_size=128)
    assert torch.equal(fused[1], eager[1])
    for got, expected in ((fused[0], eager[0]), (fused[2], eager[2])):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-6)
