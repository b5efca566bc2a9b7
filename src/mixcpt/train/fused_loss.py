"""Stage 1's loss computed a chunk of positions at a time: the same function as
`mixcpt.losses` defines, computed another way (tests/train/test_fused_loss.py and
tests/train/test_targets.py tie the two).

    cpt_loss(s, y, z, ce_weight, lssd_weight, objective=o)
        == ce_weight * losses.cross_entropy(s, y) + lssd_weight * losses.<o>_loss(s, z, y)

for each objective o in lssd, kl, mft (`cpt.objective`, design §1), and beside it the forgetting
monitor `kl_to_base` = mean KL(t || p) to the unmodified teacher, which `losses.kl_loss` defines.

Why another way: at a 128k vocabulary and 8 x 4k positions the definitions' float32 [N, V]
tensors are 16 GB each, and a naive step holds several of them for the student and the teacher.
Here ignored positions are dropped first; then, per chunk of positions, the student's (and the
teacher's) logits are made from final hidden states and the output layer, the student's
log-softmax is taken once and gives both terms, and the gradient is formed in closed form
(d CE/ds = p - onehot(y), d KL/ds = (p_T - q) / T) and kept, the size of the hidden states, not of
the logits. So only one chunk's [chunk, V] tensors exist at a time.

A teacher enters as a *target* (`mixcpt.train.targets`): `TeacherRows` (its whole distribution,
from logits or hidden states) or `TeacherTopK` (its top-k from the teacher cache, with one tail
bucket); the target turns the teacher's distribution into the objective's q, a chunk at a time
(on the CPU in a C kernel, `lssd_cpu_kernel`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixcpt.losses import IGNORE_INDEX, as_float32
from mixcpt.train.targets import Correction, Objective, StudentChunk, Target, TeacherTopK

LSSD = Correction("lssd")  # the default objective


# ---- the fused loss ---------------------------------------------------------------------
class CPTLoss(NamedTuple):
    """Means over supervised positions; all but `loss` detached, and 0 without a target."""

    loss: torch.Tensor  # ce_weight * ce + lssd_weight * distill, differentiable
    ce: torch.Tensor  # cross-entropy
    distill: torch.Tensor  # the objective's KL(q || p_T) (L_LSSD, L_KL or L_MFT)
    # supervised positions where the teacher's top-1 is the label (a count)
    teacher_top1_matches: torch.Tensor
    kl_to_base: torch.Tensor  # KL(t || p_T), t = softmax(z / T) the unmodified teacher


class LossSettings(NamedTuple):
    ce_weight: float
    lssd_weight: float
    temperature: float
    ignore_index: int
    chunk_size: int  # supervised positions per chunk
    compile: bool  # run each chunk's [c, V] work through torch.compile (`chunk_terms`)
    correction: Correction  # the objective: how the teacher's distribution becomes the target


def chunk_terms(
    s: torch.Tensor,
    y: torch.Tensor,
    target: Target | None,
    teacher_chunk: list[torch.Tensor],
    temperature: float,
    ce_share: float,
    lssd_share: float,
    correction: Correction = LSSD,
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The vocabulary-wide work of one chunk of c supervised positions (`_FusedCPTLoss`): student
    logits s [c, V] (float32, or float64), labels y [c], and the target's rows for these positions
    (`teacher_chunk`, empty without a target). Returns (g [c, V], sum of -log p[y], the target's
    sums: KL(q || p_T), KL(t || p_T), teacher top-1 matches; zeros without a target),
    g = ce_share * (p - onehot(y)) + lssd_share * (p_T - q), which the output layer's matmuls scale
    into d loss / ds."""
    log_p = F.log_softmax(s, dim=-1)  # [c, V]
    i = torch.arange(len(y), device=log_p.device)
    ce = -log_p[i, y].sum()
    grad = log_p.exp()  # p
    sums = (0.0, 0.0, 0)
    if target is not None:
        if temperature == 1:  # p_T = p: the target makes p - lssd_share * q
            student = StudentChunk(log_p, grad, lssd_share, y)
            sums = target.chunk(student, *teacher_chunk, temperature, correction)
        else:
            # the target makes p_T - q in p_T's memory;
            # then g = lssd_share * (p_T - q) + ce_share * p
            log_p_t = F.log_softmax(s / temperature, dim=-1)
            grad_t = log_p_t.exp()  # p_T
            student = StudentChunk(log_p_t, grad_t, 1.0, y)
            sums = target.chunk(student, *teacher_chunk, temperature, correction)
            grad = grad_t.mul_(lssd_share).add_(grad, alpha=ce_share)
    grad[i, y] -= ce_share
    return grad, ce, tuple(sums)


@functools.cache
def _compiled_chunk_terms():
    """`chunk_terms` through torch.compile, which fuses its passes over the [c, V] tensors (on a
    GPU, a handful of kernels instead of one per operation). Compiled at its first call, again once
    for the last, shorter chunk (whose length then becomes dynamic); forward only: the gradient is
    formed in closed form, so nothing is compiled for backward."""
    return torch.compile(chunk_terms)


class _FusedCPTLoss(torch.autograd.Function):
    """Over the supervised positions (b, t), a chunk at a time: student logits s = rows[b, t] (or
    rows[b, t] @ weight.T), log p = log_softmax(s), and

        ce      = -log p[y]                          d/ds = p - onehot(y)
        distill = KL(q || p_T), p_T = softmax(s/T)   d/ds = (p_T - q) / T

    Gradients are formed in closed form in the forward pass and stored (the size of `rows`, not of
    the logits when rows are hidden states); backward only scales them. Differentiable in rows and
    weight only.
    """

    @staticmethod
    def forward(ctx, rows, weight, labels, target, settings: LossSettings):
        (
            ce_weight,
            lssd_weight,
            temperature,
            ignore_index,
            chunk_size,
            compile_chunks,
            correction,
        ) = settings
        keep_b, keep_t = (labels != ignore_index).nonzero(as_tuple=True)  # [N] supervised positions
        n = max(len(keep_b), 1)
        teacher_data = target.per_position() if target is not None else ()
        need_rows, need_weight = (
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
        )
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = (
            torch.zeros_like(weight, dtype=as_float32(weight).dtype) if need_weight else None
        )
        # ce, KL(q || p_T), KL(t || p_T), top-1 matches
        sums = torch.zeros(4, dtype=as_float32(rows).dtype, device=rows.device)
        # d(mean loss)/ds factors
        ce_scale, lssd_scale = (ce_weight / n, lssd_weight / n / temperature)
        # d loss / ds = scale * g, g = p - lssd_share * q - ce_share * onehot(y) at T = 1; g is
        # built in place in p's memory and `scale` is applied by the output layer's matmuls, sparing
        # a [c, V] pass.
        scale = ce_scale + (lssd_scale if target is not None else 0.0)
        ce_share, lssd_share = (ce_scale / scale, lssd_scale / scale) if scale else (0.0, 0.0)
        terms = _compiled_chunk_terms() if compile_chunks else chunk_terms
        for start in range(0, len(keep_b), chunk_size):
            b, t = keep_b[start : start + chunk_size], keep_t[start : start + chunk_size]  # [c]
            x, y = rows[b, t], labels[b, t]  # [c, V|H], [c]
            s = as_float32(x if weight is None else x @ weight.T)  # [c, V] student logits
            teacher_chunk = [d[b, t] for d in teacher_data]
            grad, ce, target_sums = terms(
                s, y, target, teacher_chunk, temperature, ce_share, lssd_share, correction
            )
            sums[0] += ce
            for j, value in enumerate(target_sums, start=1):
                sums[j] += value
            if need_rows:  # scaled in float32, then cast to rows' dtype
                # [c, V|H]
                grad_x = grad if weight is None else as_float32(grad.to(weight.dtype) @ weight)
                grad_rows[b, t] = grad_x.mul_(scale).to(rows.dtype)
            # [V, H] += scale * g.T @ x, accumulated by the matmul itself where dtypes allow
            if need_weight:
                # (under autocast the out-of-place matmul keeps the autocast precision)
                if grad_weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type):
                    grad_weight.addmm_(grad.T, x, alpha=scale)
                else:
                    grad_weight.add_(grad.to(x.dtype).T @ x, alpha=scale)
        ctx.save_for_backward(
            grad_rows, None if grad_weight is None else grad_weight.to(weight.dtype)
        )
        ce, distill, kl_to_base, matches = sums[0] / n, sums[1] / n, sums[2] / n, sums[3].long()
        ctx.mark_non_differentiable(ce, distill, matches, kl_to_base)
        return ce_weight * ce + lssd_weight * distill, ce, distill, matches, kl_to_base

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def cpt_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    target: Target | None = None,
    output_weight: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    lssd_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    compile: bool = False,
    objective: Objective = "lssd",
    mft_threshold: float = 0.2,
) -> CPTLoss:
    """Stage 1's loss `ce_weight * L_CE + lssd_weight * L_<objective>` in one chunked pass (design
    §1): the value of `losses.cross_entropy` and of `losses.lssd_loss`, `kl_loss` or `mft_loss`
    (with threshold `mft_threshold`), and their gradient.

    student: logits [B, T, V], or final hidden states [B, T, H] with the output layer's
    `output_weight` [V, H] (a plain bias-free linear layer); labels [B, T], already shifted
    (labels[t] is the target of position t; `ignore_index` where nothing is supervised); target: the
    teacher's (`TeacherRows`, `TeacherTopK`) for the same positions, or None for plain CE
    (lssd_weight then unused). CE is at temperature 1, the distillation term and `kl_to_base` at
    `temperature`. Returns `CPTLoss`; means over supervised positions, float32 (float64 for float64
    inputs), 0 when none is supervised.

    `chunk_size` positions per chunk. On the CPU keep chunk * V * 4 bytes well under 32 MB:
    larger temporaries are fresh pages from the allocator each time, and faulting them in costs
    more than the arithmetic (measured in benchmarks/RESULTS.md).

    `compile` runs each chunk's vocabulary-wide work through torch.compile (`chunk_terms`): meant
    for GPUs, where the eager code launches a kernel per operation. On the CPU it replaces the
    fused C kernel, which is usually the faster of the two there.
    """
    if target is None:
        lssd_weight = 0.0
    correction = Correction(objective, mft_threshold)
    settings = LossSettings(
        ce_weight, lssd_weight, temperature, ignore_index, chunk_size, compile, correction
    )
    return CPTLoss(*_FusedCPTLoss.apply(student, output_weight, labels, target, settings))


def lssd_loss_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
) -> torch.Tensor:
    """LSSD against a teacher known only by its top-k: the bucketed KL documented in `TeacherTopK`.
    topk_ids, topk_logprobs [B, T, k]; tail_logprob [B, T]; student_logits [B, T, V]; labels [B, T].
    Returns a scalar, mean over supervised positions, differentiable in the student logits."""
    target = TeacherTopK(topk_ids, topk_logprobs, tail_logprob)
    return cpt_loss(
        student_logits, labels, target, None, 0.0, 1.0, temperature, ignore_index, chunk_size
    ).loss
