"""The fused, chunked stage-1 loss (`mixcpt.train.fused_loss`) is the function `mixcpt.losses`
defines, computed another way: value and gradient equal the definitions evaluated in float64
(themselves checked against an explicit loop in tests/test_losses.py), on both of
TeacherRows's paths (the C kernel and eager PyTorch). The top-k target is checked against the
bucketed KL of design §9."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixcpt import losses
from mixcpt.losses import logit_swap
from mixcpt.train.fused_loss import cpt_loss, lssd_loss_topk
from mixcpt.train.targets import TeacherRows, TeacherTopK, max_with_index, swap_topk_ids

IGNORE = -100


pytestmark = pytest.mark.usefixtures("both_target_paths")


def random_case(B=3, T=7, V=37, seed=0, n_ignored=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[torch.randperm(B * T, generator=g)[:n_ignored]] = IGNORE
    return student, teacher, labels


def fused_lssd(student, teacher, labels, temperature=1.0, chunk_size=256, weight=None):
    """L_LSSD alone through the fused path (ce_weight 0, lssd_weight 1)."""
    target = TeacherRows(teacher)
    return cpt_loss(student, labels, target, weight, 0.0, 1.0, temperature, IGNORE, chunk_size).loss


def reference_lssd(student, teacher, labels, temperature):
    """The definition, `losses.lssd_loss`, evaluated in float64."""
    return losses.lssd_loss(student.double(), teacher.double(), labels, temperature)


def mean_over_supervised(labels, kl_at):
    """Explicit loop over positions: the mean of kl_at(b, t, y) [float64 scalar] where
    labels[b, t] = y is supervised."""
    kls = [
        kl_at(b, t, int(labels[b, t]))
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if int(labels[b, t]) != IGNORE
    ]
    return torch.stack(kls).mean()


def reference_topk(student, teacher, labels, temperature, k):
    """Bucketed KL of design §9: top-k of the swapped teacher's probabilities plus one tail
    bucket."""

    def kl_at(b, t, y):
        q = torch.softmax(logit_swap(teacher[b, t].double(), torch.tensor(y)) / temperature, -1)
        p = torch.softmax(student[b, t].double() / temperature, -1)
        top = q.topk(k).indices
        tail = torch.ones_like(q, dtype=torch.bool)
        tail[top] = False
        qs = torch.cat([q[top], q[tail].sum(0, keepdim=True)])
        ps = torch.cat([p[top], p[tail].sum(0, keepdim=True)])
        keep = qs > 0
        return (qs[keep] * (qs[keep].log() - ps[keep].log())).sum()

    return mean_over_supervised(labels, kl_at)


def teacher_topk(teacher, k, temperature):
    """What the cache stores: top-k log-probs at T, their ids, and the log of the remaining mass."""
    log_q = torch.log_softmax(teacher.double() / temperature, -1)
    values, ids = log_q.topk(k, dim=-1)
    tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, tail


# ---- swap_topk_ids --------------------------------------------------------------------
def test_swap_topk_ids_matches_the_top_k_of_the_swapped_logits():
    _, teacher, labels = random_case(V=50, n_ignored=0)
    k = 6
    ids = swap_topk_ids(teacher.topk(k, -1).indices, labels)
    expected = logit_swap(teacher, labels).topk(k, -1).indices
    assert torch.equal(ids.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(ids[..., 0], labels)


# ---- max_with_index ------------------------------------------------------------------------
@pytest.mark.parametrize("V", [384, 100])  # two-level (128 divides V), and the fallback
def test_max_with_index_gives_the_first_maximum_as_argmax_does_even_with_ties(V):
    g = torch.Generator().manual_seed(V)
    z = torch.randint(
        -3, 4, (64, V), generator=g
    ).float()  # small integers: many rows tie at their maximum
    z[0, [5, V - 1]] = 9.0  # a tie across the first and last blocks
    values, index = max_with_index(z)
    first = torch.tensor(
        [int(np.argmax(row)) for row in z.numpy()]
    )  # numpy documents "first occurrence"
    assert torch.equal(index, first)
    assert torch.equal(values, z.amax(-1))
    assert index[0] == 5


# ---- L_LSSD through the fused path ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("V,chunk_size", [(37, 4), (50, 7), (13, 1024), (256, 8)])
def test_lssd_loss_matches_the_naive_reference_in_value_and_gradient(temperature, V, chunk_size):
    student, teacher, labels = random_case(V=V, seed=V)
    if V == 256:  # two-level top-1 (128 divides V); rounded logits tie at the top as bf16 ones do
        teacher = teacher.round()
    student.requires_grad_()
    loss = fused_lssd(student, teacher, labels, temperature, chunk_size)
    loss.backward()

    student64 = student.detach().double().requires_grad_()
    expected = reference_lssd(student64, teacher, labels, temperature)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-5, rtol=0)


def test_lssd_loss_passes_gradcheck():
    student, teacher, labels = random_case(B=2, T=3, V=5, n_ignored=1)
    student = student.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: fused_lssd(s, teacher.double(), labels, 1.5, chunk_size=2), (student,)
    )


def test_lssd_loss_is_zero_when_student_equals_teacher_and_teacher_already_predicts_the_label():
    _, teacher, _ = random_case()
    labels = teacher.argmax(-1)
    assert fused_lssd(teacher.clone(), teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    # ...but not when the labels disagree with the teacher: the target moved.
    assert fused_lssd(teacher.clone(), teacher, (labels + 1) % teacher.shape[-1]).item() > 0.1


def test_lssd_loss_ignores_masked_positions_entirely():
    student, teacher, labels = random_case()
    changed = student.clone()
    changed[labels == IGNORE] = 1e4  # garbage where nothing is supervised
    assert fused_lssd(changed, teacher, labels).item() == pytest.approx(
        fused_lssd(student, teacher, labels).item()
    )
    all_ignored = torch.full_like(labels, IGNORE)
    assert fused_lssd(student, teacher, all_ignored).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lssd_loss_accumulates_low_precision_inputs_in_float32(dtype):
    student, teacher, labels = random_case()
    s, t = student.to(dtype), teacher.to(dtype)
    loss = fused_lssd(s, t, labels, chunk_size=4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(fused_lssd(s.float(), t.float(), labels).item(), abs=1e-5)
    s.requires_grad_()
    fused_lssd(s, t, labels).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_fused_lssd_from_hidden_states_matches_logits_in_value_and_gradients():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=g).requires_grad_()
    weight = torch.randn(29, 8, generator=g).requires_grad_()
    _, teacher, labels = random_case(B=2, T=6, V=29)
    loss = fused_lssd(hidden, teacher, labels, 2.0, chunk_size=5, weight=weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected = losses.lssd_loss(hidden @ weight.T, teacher, labels, temperature=2.0)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- lssd_loss_topk (the cache's target) ---------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_lssd_loss_topk_with_the_whole_vocabulary_is_exact(temperature):
    student, teacher, labels = random_case(V=23)
    ids, values, tail = teacher_topk(teacher, 23, temperature)
    got = lssd_loss_topk(
        student, ids, values.float(), tail.float(), labels, temperature, chunk_size=5
    )
    assert got.item() == pytest.approx(
        losses.lssd_loss(student, teacher, labels, temperature).item(), abs=1e-5
    )


@pytest.mark.parametrize("k", [1, 4, 10])
def test_lssd_loss_topk_is_the_documented_bucketed_kl_and_a_lower_bound(k):
    student, teacher, labels = random_case(V=31, seed=k)
    student.requires_grad_()
    ids, values, tail = teacher_topk(teacher, k, 1.5)
    got = lssd_loss_topk(
        student, ids, values.float(), tail.float(), labels, temperature=1.5, chunk_size=4
    )
    got.backward()
    student64 = student.detach().double().requires_grad_()
    expected = reference_topk(student64, teacher, labels, 1.5, k)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-5, rtol=0)
    assert got.item() <= losses.lssd_loss(student, teacher, labels, 1.5).item() + 1e-6


def test_lssd_loss_topk_stays_finite_when_the_student_leaves_no_mass_outside_the_top_k():
    """Found in a real run: a student that puts all its float32 mass on the teacher's top-k made
    log(1 - p(top-k)) -inf and the loss inf, although the teacher keeps some mass in its tail."""
    student, teacher, labels = random_case(V=31, seed=5)
    ids, values, tail = teacher_topk(teacher, 4, 1.0)
    peaked = (
        torch.full_like(student, -60.0).scatter(-1, ids, 40.0).requires_grad_()
    )  # p(top-k) == 1 in float32
    loss = lssd_loss_topk(peaked, ids, values.float(), tail.float(), labels, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0  # the tail's missing mass is still penalised
    assert torch.isfinite(peaked.grad).all()


# ---- cross_entropy -----------------------------------------------------------------------
def test_fused_cross_entropy_matches_torch():
    student, _, labels = random_case(V=41)
    expected = torch.nn.functional.cross_entropy(
        student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )
    fused = cpt_loss(student, labels, None, chunk_size=3).loss
    assert fused.item() == pytest.approx(expected.item(), abs=1e-5)


# ---- cpt_loss: CE and LSSD fused in one pass ------------------------------------------------
def reference_cpt(student, teacher, labels, temperature, ce_weight, lssd_weight):
    """ce_weight * CE + lssd_weight * LSSD the plain way, in float64."""
    ce = torch.nn.functional.cross_entropy(
        student.double().flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )
    return ce_weight * ce + lssd_weight * reference_lssd(student, teacher, labels, temperature)


@pytest.mark.parametrize(
    "temperature,ce_weight,lssd_weight", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0), (0.7, 1.0, 0.0)]
)
@pytest.mark.parametrize("from_hidden", [False, True])
def test_cpt_loss_matches_the_reference_in_value_and_gradients(
    temperature, ce_weight, lssd_weight, from_hidden
):
    g = torch.Generator().manual_seed(11)
    B, T, H, V = (
        3,
        7,
        8,
        37,
    )  # 16 supervised positions, chunks of 5: the last chunk is short; 37 % 5 != 0
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    _, teacher, labels = random_case(B, T, V, seed=4)
    student = hidden if from_hidden else (hidden @ weight.T).detach().requires_grad_()
    got = cpt_loss(
        student,
        labels,
        TeacherRows(teacher),
        weight if from_hidden else None,
        ce_weight,
        lssd_weight,
        temperature,
        chunk_size=5,
    )
    got.loss.backward()

    hidden64, weight64 = (
        hidden.detach().double().requires_grad_(),
        weight.detach().double().requires_grad_(),
    )
    expected = reference_cpt(
        hidden64 @ weight64.T, teacher, labels, temperature, ce_weight, lssd_weight
    )
    expected.backward()
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    if from_hidden:
        torch.testing.assert_close(hidden.grad.double(), hidden64.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weight.grad.double(), weight64.grad, atol=1e-5, rtol=1e-5)
    else:
        logits64 = (hidden64 @ weight64.T).detach().requires_grad_()
        reference_cpt(logits64, teacher, labels, temperature, ce_weight, lssd_weight).backward()
        torch.testing.assert_close(student.grad.double(), logits64.grad, atol=1e-5, rtol=0)
    assert got.ce.item() == pytest.approx(
        losses.cross_entropy(hidden @ weight.T, labels).item(), abs=1e-5
    )
    assert got.distill.item() == pytest.approx(
        losses.lssd_loss(hidden @ weight.T, teacher, labels, temperature).item(), abs=1e-5
    )
    keep = labels != IGNORE
    assert got.teacher_top1_matches.item() == (teacher.argmax(-1) == labels)[keep].sum().item()


def test_cpt_loss_with_a_teacher_given_by_hidden_states_equals_the_one_given_by_logits():
    g = torch.Generator().manual_seed(5)
    teacher_hidden, teacher_weight = (
        torch.randn(2, 9, 6, generator=g),
        torch.randn(23, 6, generator=g),
    )
    student, _, labels = random_case(2, 9, 23, seed=6)
    from_logits = cpt_loss(
        student, labels, TeacherRows(teacher_hidden @ teacher_weight.T), chunk_size=4
    )
    from_hidden = cpt_loss(
        student, labels, TeacherRows(teacher_hidden, teacher_weight), chunk_size=4
    )
    for got, want in zip(from_hidden, from_logits):
        assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_cpt_loss_against_a_top_k_target_sums_ce_and_the_bucketed_kl():
    student, teacher, labels = random_case(V=31, seed=8)
    student.requires_grad_()
    ids, values, tail = teacher_topk(teacher, 6, 1.0)
    got = cpt_loss(student, labels, TeacherTopK(ids, values.float(), tail.float()), chunk_size=4)
    got.loss.backward()
    student2 = student.detach().clone().requires_grad_()
    expected = losses.cross_entropy(student2, labels) + lssd_loss_topk(
        student2, ids, values.float(), tail.float(), labels
    )
    expected.backward()
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad, student2.grad, atol=1e-6, rtol=1e-5)


def test_cpt_loss_without_a_target_is_plain_cross_entropy():
    student, _, labels = random_case(V=19)
    got = cpt_loss(student, labels, None, lssd_weight=5.0)
    expected = torch.nn.functional.cross_entropy(
        student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert got.distill.item() == 0.0
