"""Stage 1's loss computed a chunk of positions at a time: the same function as
`mixcpt.losses` defines, computed another way (tests/train/test_fused_loss.py ties the two).

    cpt_loss(s, y, z, ce_weight, lssd_weight)
        == ce_weight * losses.cross_entropy(s, y) + lssd_weight * losses.lssd_loss(s, z, y)

Why another way: at a 128k vocabulary and 8 x 4k positions the definitions' float32 [N, V]
tensors are 16 GB each, and a naive step holds several of them for the student and the teacher.
Here ignored positions are dropped first; then, per chunk of positions, the student's (and the
teacher's) logits are made from final hidden states and the output layer, the student's
log-softmax is taken once and gives both terms, and the gradient is formed in closed form
(d CE/ds = p - onehot(y), d KL/ds = (p_T - q') / T) and kept, the size of the hidden states, not of
the logits. So only one chunk's [chunk, V] tensors exist at a time. On the CPU the teacher's
vocabulary-wide work (max, softmax, swap, KL, gradient update) runs in a small C kernel
(`lssd_cpu_kernel`) a row at a time; the eager code below is its reference.

The swap never re-runs a softmax: it permutes each row of q, so only q[y] and q[m] trade places.

A teacher enters as a *target*: `SwappedTeacher` (its whole distribution, from logits or hidden
states) or `SwappedTopK` (its top-k from the teacher cache, with one tail bucket).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixcpt.losses import IGNORE_INDEX, as_float32
from mixcpt.train import lssd_cpu_kernel


def swap_topk_ids(topk_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit swap on a teacher's top-k list: y and m = topk_ids[..., 0] exchange logits, which
    is the same as exchanging their slots. When y is outside the top-k, y takes slot 0 and m moves
    to the tail with y's old logit, so the tail's probability mass is unchanged.

    topk_ids [..., k] (slot 0 = the teacher's top-1), labels [...] (supervised positions only).
    Returns the swapped ids [..., k]; each slot keeps its log-probability.
    """
    label = labels.unsqueeze(-1).to(topk_ids.dtype)  # [..., 1]
    ids = torch.where(topk_ids == label, topk_ids[..., :1], topk_ids)  # y's slot (if any) gets m
    return torch.cat([label, ids[..., 1:]], dim=-1)  # slot 0 gets y


def _rows(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def max_with_index(z: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """z [c, V] -> (z[m] [c], m [c]), m the first index of each row's maximum, as `z.max(-1)` gives.

    In two levels, because max-with-index is a slow scalar loop on the CPU (benchmarks/RESULTS.md):
    the maximum of every `block` columns, the first block holding the row's maximum, then the
    first index inside that block. Falls back to `z.max(-1)` when `block` does not divide V.
    """
    c, v = z.shape
    if v % block:
        return z.max(-1)
    blocks = z.reshape(c, v // block, block)  # [c, V/block, block]
    z_top1, first_block = blocks.amax(-1).max(-1)  # [c], [c]
    return z_top1, first_block * block + blocks[_rows(c, z), first_block].argmax(-1)


class StudentChunk(NamedTuple):
    """The student's side of one chunk of c supervised positions, as a target's `chunk` takes it."""

    log_p: torch.Tensor  # [c, V] log-softmax of the student's logits at temperature T
    grad: torch.Tensor  # [c, V] holding p = exp(log_p); the target subtracts q_scale * q' from it
    q_scale: float
    labels: torch.Tensor  # [c]


@dataclass
class SwappedTeacher:
    """The LSSD target from the teacher's whole distribution: `rows` are its logits [B, T, V], or
    its final hidden states [B, T, H] when `output_weight` [V, H] is given (then its logits are
    made a chunk at a time). Not differentiated."""

    rows: torch.Tensor
    output_weight: torch.Tensor | None = None

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.rows,)

    def chunk(self, student: StudentChunk, rows: torch.Tensor, temperature: float):
        """For one chunk of positions: the `student` side and the teacher's rows [c, V|H]. Turns
        `student.grad` in place into p - q_scale * q' (q' the swapped target) and returns (sum over
        rows of KL(q' || p), teacher top-1 matches)."""
        log_p, grad, q_scale, labels = student
        z = rows if self.output_weight is None else rows @ self.output_weight.T  # [c, V]
        z = as_float32(z) if temperature == 1 else as_float32(z) / temperature
        # the same, fused a row at a time (CPU, float32); torch.compile cannot see into the kernel
        # (a ctypes call), so a compiled loss (`chunk_terms`) runs the code below instead
        if not torch.compiler.is_compiling() and lssd_cpu_kernel.applies(z, log_p, grad):
            return lssd_cpu_kernel.swapped_target(z, log_p, grad, q_scale, labels)
        z_top1, top1 = max_with_index(z)  # [c] z[m] and m
        q = torch.softmax(z, dim=-1)  # [c, V]; its log is never made: log q = z - lse
        i = _rows(len(labels), q)
        lse = z_top1 - q[i, top1].log()  # [c] q[m] = 1 / sum exp(z - z[m]) >= 1 / V: no underflow
        # sum q log q = sum q z - lse sum q (sum q is 1 only to rounding, which would show at
        # float32), the same for the swapped q'
        neg_entropy = torch.vdot(q.flatten(), z.flatten()) - torch.vdot(lse, q.sum(-1))
        # The swap permutes each row of q, so the softmax need not be redone: only q[y] and q[m]
        # trade places (in place, on [c] entries instead of copying [c, V] logits twice).
        q_label, q_top1 = q[i, labels], q[i, top1]
        q[i, top1], q[i, labels] = q_label, q_top1
        grad.sub_(q, alpha=q_scale)
        return neg_entropy - torch.vdot(q.flatten(), log_p.flatten()), (top1 == labels).sum()


@dataclass
class SwappedTopK:
    """The LSSD target from a teacher known by its top-k (the `cache` teacher, design §6, §9):
    ids [B, T, k] most likely first, their log-probabilities `logprobs` [B, T, k] at temperature T
    (normalised over the whole vocabulary), and `tail` [B, T] the log of the remaining mass (-inf
    when k = V). The swap moves the label into slot 0 (`swap_topk_ids`); the tail keeps its mass.

    The approximation: the KL is taken between q and p *coarsened* to k + 1 buckets, the k swapped
    top tokens and one tail bucket with all other tokens. It equals the true KL when k = V and is a
    lower bound otherwise; it constrains the student's total tail mass, not its shape inside the
    tail (its gradient spreads the tail mass like the student's own tail).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.logprobs, self.tail

    def chunk(
        self,
        student: StudentChunk,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        tail: torch.Tensor,
        temperature: float,
    ):
        """As `SwappedTeacher.chunk`, with the chunk's ids, logprobs [c, k] and tail [c]. The target
        whose KL gradient is the bucketed one is q on the swapped top-k, and q_tail spread over the
        other tokens in proportion to the student's p; nothing [c, V] is allocated, and `grad` takes
        one pass (a per-row scale) plus a scatter into the top-k slots."""
        log_p, grad, q_scale, labels = student
        swapped = swap_topk_ids(ids.long(), labels)  # [c, k]
        log_q, log_p_top = as_float32(logprobs), log_p.gather(-1, swapped)  # [c, k]
        q = log_q.exp()
        kl = (q * (log_q - log_p_top)).sum()
        # [c] q_tail / p_tail, the target's scale of p in the tail
        tail_share = torch.zeros_like(q[:, 0])
        if swapped.shape[-1] < log_p.shape[-1]:  # with k == V there is no tail
            # [c] log(1 - p(top-k)) without a [c, V] pass. When the student puts (nearly) all its
            # mass on the top-k, float32 rounding makes 1 - p(top-k) zero or negative: the floor
            # keeps the loss and its gradient finite (the tail term is then underestimated, never
            # infinite).
            p_tail = -torch.expm1(log_p_top.logsumexp(-1))
            log_p_tail = torch.log(p_tail.clamp_min(torch.finfo(torch.float32).eps))
            log_q_tail = as_float32(tail)
            kl = (
                kl
                + torch.where(
                    log_q_tail > float("-inf"), log_q_tail.exp() * (log_q_tail - log_p_tail), 0.0
                ).sum()
            )
            tail_share = (log_q_tail - log_p_tail).exp()
        # target = tail_share * p everywhere, but q in the top-k slots: grad = p * (1 - q_scale *
        # tail_share) per row, then the top-k slots corrected by q_scale * (tail_share * p - q)
        grad.mul_((1 - q_scale * tail_share).unsqueeze(-1))
        grad.scatter_add_(-1, swapped, q_scale * (tail_share.unsqueeze(-1) * log_p_top.exp() - q))
        return kl, (ids[:, 0] == labels).sum()


# ---- the fused loss ---------------------------------------------------------------------
class CPTLoss(NamedTuple):
    loss: torch.Tensor  # ce_weight * ce + lssd_weight * lssd, differentiable
    ce: torch.Tensor  # mean cross-entropy over supervised positions (detached)
    lssd: torch.Tensor  # mean LSSD KL (detached; 0 without a target)
    # supervised positions where the teacher's top-1 is the label
    teacher_top1_matches: torch.Tensor


class LossSettings(NamedTuple):
    ce_weight: float
    lssd_weight: float
    temperature: float
    ignore_index: int
    chunk_size: int  # supervised positions per chunk
    compile: bool  # run each chunk's [c, V] work through torch.compile (`chunk_terms`)


def chunk_terms(
    s: torch.Tensor,
    y: torch.Tensor,
    target: SwappedTeacher | SwappedTopK | None,
    teacher_chunk: list[torch.Tensor],
    temperature: float,
    ce_share: float,
    lssd_share: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float, torch.Tensor | int]:
    """The vocabulary-wide work of one chunk of c supervised positions (`_FusedCPTLoss`): student
    logits s [c, V] (float32, or float64), labels y [c], and the target's rows for these positions
    (`teacher_chunk`, empty without a target). Returns (g [c, V], sum of -log p[y], sum of the KL,
    teacher top-1 matches), g = ce_share * (p - onehot(y)) + lssd_share * (p_T - q'), which the
    output layer's matmuls scale into d loss / ds."""
    log_p = F.log_softmax(s, dim=-1)  # [c, V]
    i = _rows(len(y), log_p)
    ce = -log_p[i, y].sum()
    grad = log_p.exp()  # p
    kl, top1 = 0.0, 0
    if target is not None:
        if temperature == 1:  # p_T = p: the target makes p - lssd_share * q'
            student = StudentChunk(log_p, grad, lssd_share, y)
            kl, top1 = target.chunk(student, *teacher_chunk, temperature=temperature)
        else:
            # the target makes p_T - q' in p_T's memory;
            # then g = lssd_share * (p_T - q') + ce_share * p
            log_p_t = F.log_softmax(s / temperature, dim=-1)
            grad_t = log_p_t.exp()  # p_T
            student = StudentChunk(log_p_t, grad_t, 1.0, y)
            kl, top1 = target.chunk(student, *teacher_chunk, temperature=temperature)
            grad = grad_t.mul_(lssd_share).add_(grad, alpha=ce_share)
    grad[i, y] -= ce_share
    return grad, ce, kl, top1


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

        ce   = -log p[y]                          d/ds = p - onehot(y)
        lssd = KL(q' || p_T), p_T = softmax(s/T)  d/ds = (p_T - q') / T

    Gradients are formed in closed form in the forward pass and stored (the size of `rows`, not of
    the logits when rows are hidden states); backward only scales them. Differentiable in rows and
    weight only.
    """

    @staticmethod
    def forward(ctx, rows, weight, labels, target, settings: LossSettings):
        ce_weight, lssd_weight, temperature, ignore_index, chunk_size, compile_chunks = settings
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
        # ce, kl, top-1 matches
        sums = torch.zeros(3, dtype=as_float32(rows).dtype, device=rows.device)
        # d(mean loss)/ds factors
        ce_scale, lssd_scale = (ce_weight / n, lssd_weight / n / temperature)
        # d loss / ds = scale * g, g = p - lssd_share * q' - ce_share * onehot(y) at T = 1; g is
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
            grad, ce, kl, top1 = terms(
                s, y, target, teacher_chunk, temperature, ce_share, lssd_share
            )
            sums[0] += ce
            sums[1] += kl
            sums[2] += top1
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
        ce, lssd, matches = sums[0] / n, sums[1] / n, sums[2].long()
        ctx.mark_non_differentiable(ce, lssd, matches)
        return ce_weight * ce + lssd_weight * lssd, ce, lssd, matches

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def cpt_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    target: SwappedTeacher | SwappedTopK | None = None,
    output_weight: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    lssd_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    compile: bool = False,
) -> CPTLoss:
    """Stage 1's loss `ce_weight * L_CE + lssd_weight * L_LSSD` in one chunked pass (design §1):
    the value of `losses.cross_entropy` and `losses.lssd_loss`, and their gradient.

    student: logits [B, T, V], or final hidden states [B, T, H] with the output layer's
    `output_weight` [V, H] (a plain bias-free linear layer); labels [B, T], already shifted
    (labels[t] is the target of position t; `ignore_index` where nothing is supervised); target: the
    teacher's (`SwappedTeacher`, `SwappedTopK`) for the same positions, or None for plain CE
    (lssd_weight then unused). CE is at temperature 1, LSSD at `temperature`. Returns `CPTLoss`;
    means over supervised positions, float32 (float64 for float64 inputs), 0 when none is
    supervised.

    `chunk_size` positions per chunk. On the CPU keep chunk * V * 4 bytes well under 32 MB:
    larger temporaries are fresh pages from the allocator each time, and faulting them in costs
    more than the arithmetic (measured in benchmarks/RESULTS.md).

    `compile` runs each chunk's vocabulary-wide work through torch.compile (`chunk_terms`): meant
    for GPUs, where the eager code launches a kernel per operation. On the CPU it replaces the
    fused C kernel, which is usually the faster of the two there.
    """
    if target is None:
        lssd_weight = 0.0
    settings = LossSettings(ce_weight, lssd_weight, temperature, ignore_index, chunk_size, compile)
    loss, ce, lssd, matches = _FusedCPTLoss.apply(student, output_weight, labels, target, settings)
    return CPTLoss(loss, ce, lssd, matches)


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
    """LSSD against a teacher known only by its top-k: the bucketed KL documented in `SwappedTopK`.
    topk_ids, topk_logprobs [B, T, k]; tail_logprob [B, T]; student_logits [B, T, V]; labels [B, T].
    Returns a scalar, mean over supervised positions, differentiable in the student logits."""
    target = SwappedTopK(topk_ids, topk_logprobs, tail_logprob)
    return cpt_loss(
        student_logits, labels, target, None, 0.0, 1.0, temperature, ignore_index, chunk_size
    ).loss
