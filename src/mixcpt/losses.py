"""The paper's equations (design.md §1, §4).

LSSD (logit swap self-distillation): at every supervised position, with teacher logits z, label y
and teacher top-1 m, the target is q = softmax(swap(z) / T) where swap exchanges z[y] and z[m];
the loss is the mean over supervised positions of KL(q || p), p = softmax(student / T).

The vocabulary-wide losses drop ignored positions first, then run over chunks of positions, so
full-vocabulary float32 logits of student and teacher never exist for a whole batch.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---- logit swap -------------------------------------------------------------------------
def logit_swap(teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """z' = z with z'[y] = z[m] and z'[m] = z[y], m = argmax z, y = the label (design §1).

    teacher_logits [..., V], labels [...]. Returns a new tensor of the same shape and dtype: each
    row is a permutation of the original whose argmax is the label. Rows whose label already is the
    argmax, or is `ignore_index`, are unchanged.
    """
    top1 = teacher_logits.argmax(-1, keepdim=True)  # [..., 1] m
    label = labels.unsqueeze(-1)  # [..., 1] y
    label = torch.where(label == ignore_index, top1, label)  # swapping m with itself changes nothing
    z_top1 = teacher_logits.gather(-1, top1)  # [..., 1] z[m]
    z_label = teacher_logits.gather(-1, label)  # [..., 1] z[y]
    return teacher_logits.scatter(-1, top1, z_label).scatter(-1, label, z_top1)


def swap_topk_ids(topk_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit swap on a teacher's top-k list: y and m = topk_ids[..., 0] exchange logits, which is
    the same as exchanging their slots. When y is outside the top-k, y takes slot 0 and m moves to
    the tail with y's old logit, so the tail's probability mass is unchanged.

    topk_ids [..., k] (slot 0 = the teacher's top-1), labels [...] (supervised positions only).
    Returns the swapped ids [..., k]; each slot keeps its log-probability.
    """
    label = labels.unsqueeze(-1).to(topk_ids.dtype)  # [..., 1]
    ids = torch.where(topk_ids == label, topk_ids[..., :1], topk_ids)  # y's slot (if any) gets m
    return torch.cat([label, ids[..., 1:]], dim=-1)  # slot 0 gets y


# ---- one chunk of supervised positions (rows) ---------------------------------------------
def _float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for accumulation; float32 and float64 (exact references) stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl_to_swapped_teacher(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """sum over rows of KL(q || p), q = softmax(swap(z) / T), p = softmax(s / T).
    student, teacher [N, V]; labels [N]."""
    log_q = F.log_softmax(_float32(logit_swap(teacher, labels)) / temperature, dim=-1)  # [N, V]
    log_p = F.log_softmax(_float32(student) / temperature, dim=-1)  # [N, V]
    return (log_q.exp() * (log_q - log_p)).sum()


def _kl_to_swapped_topk(student: torch.Tensor, topk_ids: torch.Tensor, topk_logq: torch.Tensor,
                        tail_logq: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(q || p) over k + 1 buckets: the swapped top-k tokens, and one tail bucket
    holding every other token. student [N, V]; topk_ids, topk_logq [N, k]; tail_logq, labels [N]."""
    ids = swap_topk_ids(topk_ids.long(), labels)  # [N, k]
    log_q = _float32(topk_logq)  # [N, k]
    log_p = F.log_softmax(_float32(student) / temperature, dim=-1)  # [N, V]
    kl = (log_q.exp() * (log_q - log_p.gather(-1, ids))).sum()
    if ids.shape[-1] < log_p.shape[-1]:  # with k == V there is no tail
        log_q_tail = _float32(tail_logq)  # [N]
        log_p_tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)  # [N] student mass outside top-k
        kl = kl + (log_q_tail.exp() * (log_q_tail - log_p_tail)).sum()
    return kl


def _nll(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(s)[y]. student [N, V]; labels [N]."""
    return F.cross_entropy(_float32(student), labels, reduction="sum")


# ---- chunking ---------------------------------------------------------------------------
class _ChunkedSum(torch.autograd.Function):
    """sum over chunks of rows of `chunk_loss(logits[c], *row_data[c])`, logits = rows, or
    rows @ weight.T when the output layer `weight` [V, H] is given and rows are hidden states [N, H].

    Each chunk's gradient is taken at once, in the forward pass, so one chunk's float32 [c, V]
    intermediates are freed before the next (as fused linear-cross-entropy kernels do); backward
    only scales the stored gradients. Differentiable in rows and weight only.
    """

    @staticmethod
    def forward(ctx, chunk_loss: Callable, chunk_size: int, rows: torch.Tensor, weight: torch.Tensor | None,
                *row_data: torch.Tensor) -> torch.Tensor:
        need_rows, need_weight = ctx.needs_input_grad[2], weight is not None and ctx.needs_input_grad[3]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=_float32(weight).dtype) if need_weight else None
        total = torch.zeros((), dtype=_float32(rows).dtype, device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            with torch.enable_grad():
                r = rows[chunk].detach().requires_grad_(need_rows)
                w = None if weight is None else weight.detach().requires_grad_(need_weight)
                logits = r if w is None else r @ w.T  # [c, V]
                loss = chunk_loss(logits, *(d[chunk] for d in row_data))
                wrt = [t for t, need in ((r, need_rows), (w, need_weight)) if need]
                grads = list(torch.autograd.grad(loss, wrt)) if wrt else []
            if need_rows:
                grad_rows[chunk] = grads.pop(0)
            if need_weight:
                grad_weight += grads.pop(0)
            total += loss.detach()
        ctx.save_for_backward(grad_rows, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.n_row_data = len(row_data)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_rows, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in (grad_rows, grad_weight)]
        return (None, None, *scaled, *[None] * ctx.n_row_data)


def _mean_over_supervised(chunk_loss: Callable, rows: torch.Tensor, weight: torch.Tensor | None,
                          labels: torch.Tensor, per_position: tuple[torch.Tensor, ...], ignore_index: int,
                          chunk_size: int) -> torch.Tensor:
    """Mean of `chunk_loss` over the positions whose label is not `ignore_index`; those are dropped
    before anything vocabulary-wide is computed. rows [B, T, V] logits (or [B, T, H] hidden states
    with `weight` [V, H]); labels [B, T]; each of per_position [B, T, ...]."""
    keep = labels != ignore_index  # [B, T]
    total = _ChunkedSum.apply(chunk_loss, chunk_size, rows[keep], weight, *(x[keep] for x in per_position),
                              labels[keep])
    return total / keep.sum().clamp(min=1)


# ---- the losses -------------------------------------------------------------------------
def lssd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """L_LSSD = mean over supervised positions of KL(softmax(swap(z) / T) || softmax(s / T)).

    student_logits, teacher_logits [B, T, V]; labels [B, T], already shifted (labels[t] is the
    target of logits[t]). Returns a scalar (float32, float64 for float64 inputs), differentiable in
    the student logits; 0 when no position is supervised.
    """
    kl = partial(_kl_to_swapped_teacher, temperature=temperature)
    return _mean_over_supervised(kl, student_logits, None, labels, (teacher_logits,), ignore_index, chunk_size)


def lssd_loss_from_hidden(student_hidden: torch.Tensor, output_weight: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: torch.Tensor, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                          chunk_size: int = 1024) -> torch.Tensor:
    """`lssd_loss` with student logits = student_hidden @ output_weight.T computed chunk by chunk,
    so the student's full logits never exist (a plain linear output layer: no bias, no softcap).

    student_hidden [B, T, H]; output_weight [V, H]; teacher_logits [B, T, V]; labels [B, T].
    Differentiable in the hidden states and the output weight.
    """
    kl = partial(_kl_to_swapped_teacher, temperature=temperature)
    return _mean_over_supervised(kl, student_hidden, output_weight, labels, (teacher_logits,), ignore_index,
                                 chunk_size)


def lssd_loss_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   tail_logprob: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """LSSD against a teacher known only by its top-k (the `cache` teacher, design §6, §9).

    topk_ids [B, T, k]: the teacher's k most likely tokens, most likely first; topk_logprobs
    [B, T, k]: their log-probabilities at temperature T (normalised over the full vocabulary);
    tail_logprob [B, T]: log of the teacher's remaining mass (-inf when k = V). The swap moves the
    label into slot 0 (see `swap_topk_ids`); the tail mass is unchanged by it.

    The approximation: the KL is taken between q and p *coarsened* to k + 1 buckets, the k swapped
    top tokens and one tail bucket with all other tokens (the student's tail mass is
    logsumexp of its log-probs outside the top-k). This equals the true KL exactly when k = V and
    is a lower bound of it otherwise; it constrains the student's total tail mass, not its shape
    inside the tail (its gradient spreads the tail mass like the student's own tail).
    Returns a scalar, mean over supervised positions, differentiable in the student logits.
    """
    kl = partial(_kl_to_swapped_topk, temperature=temperature)
    return _mean_over_supervised(kl, student_logits, None, labels, (topk_ids, topk_logprobs, tail_logprob),
                                 ignore_index, chunk_size)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  chunk_size: int = 1024) -> torch.Tensor:
    """L_CE = mean over supervised positions of -log softmax(s)[y], chunked like `lssd_loss`.
    student_logits [B, T, V]; labels [B, T], already shifted. Returns a scalar."""
    return _mean_over_supervised(_nll, student_logits, None, labels, (), ignore_index, chunk_size)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] sum of log p(chosen response | prompt) under the policy
    policy_rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor,  # [B] the same under the frozen reference
    ref_rejected_logps: torch.Tensor,  # [B]
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: L = -log sigmoid(beta * ((pc - rc) - (pr - rr))), averaged over the batch.

    Returns (loss scalar, chosen_rewards [B], rejected_rewards [B]) with rewards beta * (p - r),
    detached as they are for logging only.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
