"""The paper's equations (design.md §1, §4), one function each, as the paper writes them.

Logits are [B, T, V] and labels [B, T], already shifted: labels[t] is the target of logits[t];
positions whose label is `ignore_index` contribute nothing. With teacher logits z, label y and
the teacher's top-1 m = argmax z (its first index), at every supervised position:

    z'      = z with z'[y] = z[m] and z'[m] = z[y]          logit_swap
    q       = softmax(z' / T)                               the LSSD target
    p       = softmax(s / T)                                the student
    L_LSSD  = mean KL(q || p) = mean sum_v q_v (log q_v - log p_v)   lssd_loss
    t       = softmax(z / T)                                the teacher as it is
    L_KL    = mean KL(t || p)                               kl_loss (plain distillation)
    lam     = (t_m - t_y + tau) / (1 + t_m - t_y)   if m != y          mft_mixin
              (min(t_y + tau, 1) - t_y) / (1 - t_y) if m == y
    q_MFT   = (1 - lam) t + lam onehot(y)                   mft_target (Minifinetuning)
    L_MFT   = mean KL(q_MFT || p)                           mft_loss
    L_CE    = mean -log softmax(s)[y]                       cross_entropy
    L_CPT   = ce_weight * L_CE + lssd_weight * L_<objective>   stage 1's loss (`cpt.objective`)
    L_DPO   = -log sigmoid(beta * ((pc - rc) - (pr - rr)))  dpo_loss

These functions hold whole [N, V] float32 tensors and are the definitions. Training computes the
same L_CPT a chunk of positions at a time, from hidden states, with the gradient in closed form
(`mixcpt.train.fused_loss.cpt_loss`, and a C kernel on the CPU), and beside it `kl_to_base`, the
KL(t || p) of `kl_loss` that monitors forgetting; tests/train/test_fused_loss.py and
tests/train/test_targets.py hold that path equal to these definitions in value and gradient. None
has a T^2 factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixcpt.data.packing import IGNORE_INDEX


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for the softmax; float32 and float64 (exact references) stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logit_swap(
    teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """z' = z with z'[y] = z[m] and z'[m] = z[y], m = argmax z, y = the label.

    teacher_logits [..., V], labels [...]. Returns a new tensor of the same shape and dtype: each
    row is a permutation of the original whose argmax is the label. Rows whose label already is the
    argmax, or is `ignore_index`, are unchanged.
    """
    top1 = teacher_logits.argmax(-1, keepdim=True)  # [..., 1] m
    label = labels.unsqueeze(-1)  # [..., 1] y
    label = torch.where(label == ignore_index, top1, label)  # swapping m with itself: no change
    z_top1 = teacher_logits.gather(-1, top1)  # [..., 1] z[m]
    z_label = teacher_logits.gather(-1, label)  # [..., 1] z[y]
    return teacher_logits.scatter(-1, top1, z_label).scatter(-1, label, z_top1)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """L_KL = mean over supervised positions of KL(softmax(z / T) || softmax(s / T)): plain
    distillation to the teacher, uncorrected (labels only choose the positions).

    student_logits, teacher_logits [B, T, V]; labels [B, T]. Returns a scalar (float32, float64
    for float64 inputs), differentiable in the student logits; 0 when nothing is supervised.
    """
    supervised = labels != ignore_index  # [B, T]
    log_t = F.log_softmax(as_float32(teacher_logits[supervised]) / temperature, dim=-1)  # [N, V]
    log_p = F.log_softmax(as_float32(student_logits[supervised]) / temperature, dim=-1)  # [N, V]
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)  # [N] KL(t || p), the t log t term included
    return kl.sum() / max(len(kl), 1)


def lssd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """L_LSSD = mean over supervised positions of KL(softmax(swap(z) / T) || softmax(s / T)): plain
    distillation (`kl_loss`) to the swapped teacher.

    student_logits, teacher_logits [B, T, V]; labels [B, T]. Returns a scalar (float32, float64
    for float64 inputs), differentiable in the student logits; 0 when nothing is supervised.
    """
    z_swapped = logit_swap(teacher_logits, labels, ignore_index)  # [B, T, V] z'
    return kl_loss(student_logits, z_swapped, labels, temperature, ignore_index)


def mft_mixin(
    t_top1: torch.Tensor, t_label: torch.Tensor, label_is_top1: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Minifinetuning's mixing weight lam of the label's one-hot into the teacher's distribution
    (arXiv 2506.15702; as NVIDIA ModelOpt builds it, `MFTLoss._prepare_corrected_distributions`
    in modelopt/torch/distill/losses.py):

        m != y:  lam = (t_m - t_y + tau) / (1 + t_m - t_y)   so that q_y = q_m + tau
        m == y:  lam = (min(t_y + tau, 1) - t_y) / (1 - t_y)  so that q_y = min(t_y + tau, 1)

    The second is written as 1 where t_y + tau >= 1 (q is then the one-hot) and tau / (1 - t_y)
    elsewhere, so t_y = 1 makes no 0 / 0 (ModelOpt adds 1e-7 to both denominators instead).
    t_top1 = t_m, t_label = t_y, label_is_top1 (m == y): tensors of one shape. Returns lam in
    [0, 1], of that shape.
    """
    wrong_top1 = (t_top1 - t_label + threshold) / (1 + t_top1 - t_label)
    lifted = torch.where(
        t_label + threshold >= 1, 1.0, threshold / (1 - t_label).clamp_min(threshold)
    )
    return torch.where(label_is_top1, lifted, wrong_top1)


def mft_target(teacher_probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """q = (1 - lam) t + lam onehot(y), lam = `mft_mixin`: teacher_probs t [N, V] (its top-1 m =
    the first index of its maximum), labels [N] in [0, V). Returns q [N, V]."""
    i = torch.arange(len(labels), device=labels.device)
    top1 = teacher_probs.argmax(-1)  # [N] m
    lam = mft_mixin(teacher_probs[i, top1], teacher_probs[i, labels], top1 == labels, threshold)
    onehot = F.one_hot(labels, teacher_probs.shape[-1]).to(teacher_probs.dtype)  # [N, V]
    return (1 - lam).unsqueeze(-1) * teacher_probs + lam.unsqueeze(-1) * onehot


def mft_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.2,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """L_MFT = mean over supervised positions of KL(q || softmax(s / T)), q = `mft_target` of
    t = softmax(z / T) with threshold tau (Minifinetuning, arXiv 2506.15702; ModelOpt's `MFTLoss`
    without its T^2 factor, as the other losses here).

    student_logits, teacher_logits [B, T, V]; labels [B, T]. Returns a scalar as `kl_loss` does.
    """
    supervised = labels != ignore_index  # [B, T]
    t = torch.softmax(as_float32(teacher_logits[supervised]) / temperature, dim=-1)  # [N, V]
    q = mft_target(t, labels[supervised], threshold)  # [N, V]
    log_p = F.log_softmax(as_float32(student_logits[supervised]) / temperature, dim=-1)  # [N, V]
    kl = (torch.xlogy(q, q) - q * log_p).sum(-1)  # [N] KL(q || p); q_v = 0 adds 0
    return kl.sum() / max(len(kl), 1)


def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """L_CE = mean over supervised positions of -log softmax(s)[y].

    student_logits [B, T, V]; labels [B, T]. Returns a scalar; 0 when nothing is supervised.
    """
    supervised = labels != ignore_index  # [B, T]
    log_p = F.log_softmax(as_float32(student_logits[supervised]), dim=-1)  # [N, V]
    nll = -log_p.gather(-1, labels[supervised].unsqueeze(-1)).squeeze(-1)  # [N]
    return nll.sum() / max(len(nll), 1)


def next_token_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, T] -> [B, T] whose position t holds token t + 1 (the last position is ignored),
    so logits and hidden states are used unsliced: slicing them would copy them and their
    gradient."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] sum of log p(chosen response | prompt), the policy
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
