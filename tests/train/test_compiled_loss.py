"""`cpt.compile_loss`: the chunked loss with each chunk's work through torch.compile gives the loss
and gradients of the eager code it compiles, and of the C kernel the CPU runs otherwise.

One small case compiles once (about 10 s here with inductor's cache warm, 35 s cold on a loaded
2-core CPU; the inductor CPU backend needs a C++ compiler). Its chunks all have the same length, so
nothing is compiled a second time for a shorter last chunk.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from mixcpt.train import lssd_cpu_kernel
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.targets import TeacherRows

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on the CPU needs a C++ compiler",
)


def loss_and_gradients(compile: bool, objective: str) -> tuple[torch.Tensor, ...]:
    """CE + the objective's term of a student and a teacher given by hidden states (the trainer's
    path): 12 supervised positions in 3 chunks of 4, a 64-token vocabulary. Returns (loss, ce,
    distill, top-1 matches, kl_to_base, d loss/d hidden, d loss/d output weight)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 8, 16, 64
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(B, T, H, generator=g)
    teacher_weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    labels[1, :3] = (teacher_hidden[1, :3] @ teacher_weight.T).argmax(-1)  # no swap at these
    target = TeacherRows(teacher_hidden, teacher_weight)
    result = cpt_loss(
        hidden, labels, target, weight, chunk_size=4, compile=compile, objective=objective
    )
    result.loss.backward()
    return (*result, hidden.grad, weight.grad)


@pytest.mark.parametrize("objective", ["lssd", "mft"])
def test_the_compiled_loss_equals_the_eager_one_in_value_and_gradients(monkeypatch, objective):
    kernel = loss_and_gradients(False, objective)
    with monkeypatch.context() as patch:
        patch.setattr(lssd_cpu_kernel, "applies", lambda *tensors: False)
        eager = loss_and_gradients(False, objective)
    compiled = loss_and_gradients(True, objective)
    assert compiled[3].item() == eager[3].item() >= 3  # top-1 matches: a count
    for reference in (eager, kernel):
        for got, want in zip(compiled, reference):
            torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-5)
