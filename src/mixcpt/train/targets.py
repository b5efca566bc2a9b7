"""The teacher's side of stage 1's chunked loss (`fused_loss`): a teacher enters as a *target*,
`TeacherRows` (its whole distribution, from logits or final hidden states: the online and LoRA
teachers) or `TeacherTopK` (its top-k and one tail bucket: the cache teacher), and for one chunk
of positions it corrects the teacher's distribution t = softmax(z / T) into the objective's q
(`cpt.objective`, design §1; the definitions are `mixcpt.losses`):

    lssd  q = t with q[y] and q[m] exchanged (the logit swap permutes t: no second softmax)
    kl    q = t
    mft   q = (1 - lam) t + lam onehot(y), lam = `losses.mft_mixin`

subtracts q_scale * q from the student's p in place (the KL's gradient), and returns the sums
over the chunk of KL(q || p) and of KL(t || p), the forgetting monitor (`kl_to_base`: the student's
distance from the unmodified teacher, at the same temperature T as the loss), which costs one more
dot product a row. On the CPU the whole-distribution work runs in a C kernel (`lssd_cpu_kernel`);
the eager code below is its reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from mixcpt.losses import as_float32, mft_mixin
from mixcpt.train import lssd_cpu_kernel

Objective = Literal["lssd", "kl", "mft"]


class Correction(NamedTuple):
    """How the teacher's distribution becomes the target: `objective`, and mft's threshold tau."""

    objective: Objective = "lssd"
    threshold: float = 0.2


class StudentChunk(NamedTuple):
    """The student's side of one chunk of c supervised positions, as a target's `chunk` takes it."""

    log_p: torch.Tensor  # [c, V] log-softmax of the student's logits at temperature T
    grad: torch.Tensor  # [c, V] holding p = exp(log_p); the target subtracts q_scale * q from it
    q_scale: float
    labels: torch.Tensor  # [c]


class TargetSums(NamedTuple):
    """What a target's `chunk` returns, summed over the chunk's rows."""

    kl: torch.Tensor  # KL(q || p), q the objective's target
    kl_to_base: torch.Tensor  # KL(t || p), t the teacher's own distribution
    top1_matches: torch.Tensor  # rows whose teacher top-1 is the label


def _rows(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[c, V], [c, V] -> [c] sum of a * b per row, without a [c, V] temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(-1)).flatten()


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


@dataclass
class TeacherRows:
    """The teacher's whole distribution: `rows` are its logits [B, T, V], or its final hidden states
    [B, T, H] when `output_weight` [V, H] is given (then its logits are made a chunk at a time).
    Not differentiated."""

    rows: torch.Tensor
    output_weight: torch.Tensor | None = None

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.rows,)

    def chunk(
        self, student: StudentChunk, rows: torch.Tensor, temperature: float, correction: Correction
    ) -> TargetSums:
        """For one chunk of positions: the `student` side and the teacher's rows [c, V|H]. Turns
        `student.grad` in place into p - q_scale * q (q the `correction`'s target)."""
        log_p, grad, q_scale, labels = student
        z = rows if self.output_weight is None else rows @ self.output_weight.T  # [c, V]
        z = as_float32(z) if temperature == 1 else as_float32(z) / temperature
        # the same, fused a row at a time (CPU, float32); torch.compile cannot see into the kernel
        # (a ctypes call), so a compiled loss (`chunk_terms`) runs the code below instead
        if not torch.compiler.is_compiling() and lssd_cpu_kernel.applies(z, log_p, grad):
            return TargetSums(
                *lssd_cpu_kernel.teacher_target(z, log_p, grad, q_scale, labels, *correction)
            )
        z_top1, top1 = max_with_index(z)  # [c] z[m] and m
        t = torch.softmax(z, dim=-1)  # [c, V]; its log is never made: log t = z - lse
        i = _rows(len(labels), t)
        t_top1, t_label = t[i, top1], t[i, labels]  # [c]
        lse = z_top1 - t_top1.log()  # [c] t[m] = 1 / sum exp(z - z[m]) >= 1 / V: no underflow
        # sum t log t = sum t z - lse sum t (sum t is 1 only to rounding, which would show at
        # float32); sum t log p. Row by row: mft weighs each row by its own lam.
        neg_entropy = _row_dot(t, z) - lse * t.sum(-1)  # [c]
        cross = _row_dot(t, log_p)  # [c]
        kl_to_base = neg_entropy - cross  # [c] KL(t || p)
        objective, threshold = correction
        if objective == "kl":
            kl = kl_to_base
        elif objective == "lssd":
            # KL(q || p) = KL(t || p) + (t_m - t_y)(log p_m - log p_y) (design §1); the swap
            # permutes each row of t in place: only t[y] and t[m] trade places
            kl = kl_to_base + (t_top1 - t_label) * (log_p[i, top1] - log_p[i, labels])
            t[i, top1], t[i, labels] = t_label, t_top1
        else:  # mft: q_v = (1 - lam) t_v, and q_y = (1 - lam) t_y + lam
            lam = mft_mixin(t_top1, t_label, top1 == labels, threshold)  # [c]
            keep = 1 - lam
            q_label = keep * t_label + lam
            # sum over v != y of q log q = (1 - lam) (sum t log t - t_y log t_y)
            #                              + (1 - t_y) xlogx(1 - lam)
            neg_entropy_q = (
                keep * (neg_entropy - torch.xlogy(t_label, t_label))
                + (1 - t_label) * torch.xlogy(keep, keep)
                + torch.xlogy(q_label, q_label)
            )
            kl = neg_entropy_q - (keep * cross + lam * log_p[i, labels])
            t.mul_(keep.unsqueeze(-1))
            t[i, labels] += lam
        grad.sub_(t, alpha=q_scale)
        return TargetSums(kl.sum(), kl_to_base.sum(), (top1 == labels).sum())


def swap_topk_ids(topk_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit swap on a teacher's top-k list: y and m = topk_ids[..., 0] exchange logits, which
    is the same as exchanging their slots. When y is outside the top-k, y takes slot 0 and m moves
    to the tail with y's old logit, so the tail's probability mass is unchanged.

    topk_ids [..., k] (slot 0 = the teacher's top-1), labels [...] (supervised positions only).
    Returns the swapped ids [..., k]; each slot keeps its probability.
    """
    label = labels.unsqueeze(-1).to(topk_ids.dtype)  # [..., 1]
    ids = torch.where(topk_ids == label, topk_ids[..., :1], topk_ids)  # y's slot (if any) gets m
    return torch.cat([label, ids[..., 1:]], dim=-1)  # slot 0 gets y


def mft_topk(
    ids: torch.Tensor,
    t: torch.Tensor,
    t_tail: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minifinetuning's target on a top-k list: ids, t [c, k] (most likely first), t_tail [c] the
    remaining mass, labels [c], over a vocabulary of `vocab` tokens. Returns the buckets' ids
    [c, k], q [c, k] and q_tail [c].

    Where y is outside the top-k its t_y is not stored: y takes the last slot, whose token joins
    the tail with its mass, and t_y is estimated as the tail's mean token mass t_tail / (V - k)
    (at most the last slot's, as every tail token is), taken out of the tail so the buckets still
    sum to 1. With k = V the label is always listed and the target is exact.
    """
    k = ids.shape[-1]
    at_label = ids == labels.unsqueeze(-1)  # [c, k]
    listed = at_label.any(-1)  # [c]
    estimate = t_tail / max(vocab - k, 1)  # [c]
    t_label = torch.where(listed, (t * at_label).sum(-1), estimate)
    lam = mft_mixin(t[:, 0], t_label, ids[:, 0] == labels, threshold)  # [c]
    last = torch.zeros_like(at_label)
    last[:, -1] = True
    at_label = torch.where(listed.unsqueeze(-1), at_label, last)  # [c, k] y's bucket
    unlisted = ~listed.unsqueeze(-1) & last
    ids = torch.where(unlisted, labels.unsqueeze(-1).to(ids.dtype), ids)
    t_tail = torch.where(listed, t_tail, t_tail + t[:, -1] - estimate)
    t = torch.where(unlisted, estimate.unsqueeze(-1), t)
    keep = (1 - lam).unsqueeze(-1)  # [c, 1]
    return ids, keep * t + lam.unsqueeze(-1) * at_label, keep.squeeze(-1) * t_tail


def student_buckets(log_p: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log p [c, V] coarsened to the buckets `ids` [c, k] and one tail: (log p of the
    k ids [c, k], log of the rest [c]; -inf when k = V). log(1 - p(top-k)) is made without a [c, V]
    pass. When the student puts (nearly) all its mass on the top-k, float32 rounding makes
    1 - p(top-k) zero or negative: a floor keeps the loss and its gradient finite (the tail term is
    then underestimated, never infinite)."""
    log_p_top = log_p.gather(-1, ids)
    if ids.shape[-1] == log_p.shape[-1]:
        return log_p_top, torch.full_like(log_p_top[:, 0], float("-inf"))
    p_tail = -torch.expm1(log_p_top.logsumexp(-1))
    return log_p_top, torch.log(p_tail.clamp_min(torch.finfo(torch.float32).eps))


def bucketed_kl(
    q: torch.Tensor, q_tail: torch.Tensor, log_p_top: torch.Tensor, log_p_tail: torch.Tensor
) -> torch.Tensor:
    """Sum over rows of KL between q [c, k] with q_tail [c] and the student's buckets (as
    `student_buckets` gives them); empty buckets (q = 0) add 0."""
    kl = (torch.xlogy(q, q) - q * log_p_top).sum()
    tail = q_tail > 0
    return kl + torch.where(tail, torch.xlogy(q_tail, q_tail) - q_tail * log_p_tail, 0.0).sum()


@dataclass
class TeacherTopK:
    """The teacher known by its top-k (the `cache` teacher, design §6, §9): ids [B, T, k] most
    likely first, their log-probabilities `logprobs` [B, T, k] at temperature T (normalised over
    the whole vocabulary), and `tail` [B, T] the log of the remaining mass (-inf when k = V).
    The objective's correction moves probability between buckets: lssd moves the label into slot 0
    (`swap_topk_ids`), kl moves nothing, mft mixes in the label's one-hot (`mft_topk`, which
    estimates t_y when the label is outside the top-k); the tail keeps its share.

    The approximation: the KL is taken between q and p *coarsened* to k + 1 buckets, the k listed
    tokens and one tail bucket with all other tokens. It equals the true KL when k = V and is a
    lower bound otherwise (for mft with the label outside the top-k, of the KL to the target made
    with t_y estimated); it constrains the student's total tail mass, not its shape inside the
    tail (its gradient spreads the tail mass like the student's own tail). `kl_to_base` is the
    bucketed KL(t || p) on the teacher's own top-k.
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
        correction: Correction,
    ) -> TargetSums:
        """As `TeacherRows.chunk`, with the chunk's ids, logprobs [c, k] and tail [c]. The target
        whose KL gradient is the bucketed one is q on the k buckets, and q_tail spread over the
        other tokens in proportion to the student's p; nothing [c, V] is allocated, and `grad`
        takes one pass (a per-row scale) plus a scatter into the top-k slots."""
        log_p, grad, q_scale, labels = student
        ids = ids.long()
        t, t_tail = as_float32(logprobs).exp(), as_float32(tail).exp()  # [c, k], [c]
        base_buckets = student_buckets(log_p, ids)
        kl_to_base = bucketed_kl(t, t_tail, *base_buckets)
        objective, threshold = correction
        if objective == "kl":
            buckets, q, q_tail, (log_p_top, log_p_tail) = ids, t, t_tail, base_buckets
        else:
            if objective == "lssd":
                buckets, q, q_tail = swap_topk_ids(ids, labels), t, t_tail
            else:
                buckets, q, q_tail = mft_topk(ids, t, t_tail, labels, log_p.shape[-1], threshold)
            log_p_top, log_p_tail = student_buckets(log_p, buckets)
        kl = bucketed_kl(q, q_tail, log_p_top, log_p_tail)
        # [c] q_tail / p_tail, the target's scale of p in the tail (0 when k = V: no tail)
        tail_share = q_tail / log_p_tail.exp().clamp_min(torch.finfo(log_p.dtype).tiny)
        tail_share = torch.where(log_p_tail > float("-inf"), tail_share, 0.0)
        # target = tail_share * p everywhere, but q in the top-k slots: grad = p * (1 - q_scale *
        # tail_share) per row, then the top-k slots corrected by q_scale * (tail_share * p - q)
        grad.mul_((1 - q_scale * tail_share).unsqueeze(-1))
        grad.scatter_add_(-1, buckets, q_scale * (tail_share.unsqueeze(-1) * log_p_top.exp() - q))
        return TargetSums(kl, kl_to_base, (ids[:, 0] == labels).sum())


Target = TeacherRows | TeacherTopK
