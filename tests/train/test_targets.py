"""The corrected-teacher family on the chunked loss path (`mixcpt.train.targets` through
`fused_loss.cpt_loss`): for every objective (lssd, kl, mft), value and gradient equal the dense
definitions of `mixcpt.losses` evaluated in float64 (themselves checked against explicit loops in
tests/test_losses.py), and `kl_to_base` equals a dense float64 KL(t || p); on both paths of the
whole-distribution target (the C kernel and eager PyTorch), from logits and from hidden states,
and for the top-k target exactly at k = V and as the documented bucketed KL at k < V."""

from __future__ import annotations

import pytest
import torch

from mixcpt import losses
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.targets import TeacherRows, TeacherTopK

IGNORE = -100
OBJECTIVES = ["lssd", "kl", "mft"]


pytestmark = pytest.mark.usefixtures("both_target_paths")


def case(B=3, T=7, V=37, seed=0, n_ignored=5, ties=False):
    """Student and teacher logits [B, T, V] and labels [B, T]: a third of the labels are the
    teacher's top-1, `n_ignored` positions are ignored; `ties` rounds the teacher's logits so that
    rows tie at their maximum (as bf16 logits do)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher = torch.randn(B, T, V, generator=g) * 3
    if ties:
        teacher = teacher.round()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[::3] = teacher.argmax(-1).view(-1)[::3]
    labels.view(-1)[torch.randperm(B * T, generator=g)[:n_ignored]] = IGNORE
    return student, teacher, labels


def definition(objective, student, teacher, labels, temperature, threshold=0.2):
    """The objective's dense definition (`mixcpt.losses`) in float64."""
    s, z = student.double(), teacher.double()
    if objective == "lssd":
        return losses.lssd_loss(s, z, labels, temperature)
    if objective == "kl":
        return losses.kl_loss(s, z, labels, temperature)
    return losses.mft_loss(s, z, labels, threshold, temperature)


def fused(objective, student, labels, target, temperature, threshold=0.2, weight=None, chunk=4):
    """The objective's term alone through the chunked path (ce_weight 0, lssd_weight 1)."""
    return cpt_loss(
        student,
        labels,
        target,
        weight,
        0.0,
        1.0,
        temperature,
        IGNORE,
        chunk,
        objective=objective,
        mft_threshold=threshold,
    )


def assert_matches_definition(got, student, expected, student64):
    """`got` (a CPTLoss) against `expected` (a float64 scalar of student64) in value and
    gradient."""
    got.loss.backward()
    expected.backward()
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert got.distill.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize(
    "temperature,threshold,ties", [(1.0, 0.2, False), (2.0, 0.2, True), (0.5, 0.6, False)]
)
def test_each_objective_from_teacher_logits_is_its_definition_in_value_and_gradient(
    objective, temperature, threshold, ties
):
    student, teacher, labels = case(seed=int(temperature * 10), ties=ties)
    student.requires_grad_()
    got = fused(objective, student, labels, TeacherRows(teacher), temperature, threshold)
    student64 = student.detach().double().requires_grad_()
    expected = definition(objective, student64, teacher, labels, temperature, threshold)
    assert_matches_definition(got, student, expected, student64)
    base = losses.kl_loss(student64.detach(), teacher.double(), labels, temperature)
    assert got.kl_to_base.item() == pytest.approx(base.item(), abs=1e-5)
    keep = labels != IGNORE
    assert got.teacher_top1_matches.item() == (teacher.argmax(-1) == labels)[keep].sum().item()


@pytest.mark.parametrize("objective", ["kl", "mft"])
def test_each_objective_from_teacher_hidden_states_with_the_output_layer(objective):
    """The online and LoRA teachers' form: the teacher's final hidden states and output weight;
    the student from hidden states too (gradients to both of its inputs)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=g).requires_grad_()
    weight = torch.randn(29, 8, generator=g).requires_grad_()
    teacher_hidden, teacher_weight = (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(29, 8, generator=g),
    )
    _, _, labels = case(B=2, T=6, V=29, seed=4)
    target = TeacherRows(teacher_hidden, teacher_weight)
    got = fused(objective, hidden, labels, target, 2.0, weight=weight, chunk=5)
    grads = torch.autograd.grad(got.loss, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    teacher = teacher_hidden.double() @ teacher_weight.double().T
    expected = definition(objective, h64 @ w64.T, teacher, labels, 2.0)
    expected_grads = torch.autograd.grad(expected, (h64, w64))
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for mine, want in zip(grads, expected_grads):
        torch.testing.assert_close(mine.double(), want, atol=1e-5, rtol=1e-5)
    base = losses.kl_loss(h64.detach() @ w64.detach().T, teacher, labels, 2.0)
    assert got.kl_to_base.item() == pytest.approx(base.item(), abs=1e-5)


def test_mft_where_the_target_is_the_label_alone():
    """t_y + tau >= 1 at the top-1 makes lam = 1: q is the one-hot, every other q_v is 0 (no
    0 log 0, no 0 / 0 where t_y rounds to 1)."""
    student, teacher, labels = case(V=23, seed=9, n_ignored=0)
    teacher = teacher.clone()
    teacher[0, 0, labels[0, 0]] = 40.0  # t_y = 1 in float32
    teacher[0, 1, labels[0, 1]] = 5.0  # t_y near 0.9
    student.requires_grad_()
    got = fused("mft", student, labels, TeacherRows(teacher), 1.0, threshold=0.3)
    student64 = student.detach().double().requires_grad_()
    expected = definition("mft", student64, teacher, labels, 1.0, threshold=0.3)
    assert torch.isfinite(got.loss)
    assert_matches_definition(got, student, expected, student64)


def test_the_objectives_differ_and_kl_to_base_does_not_depend_on_the_objective():
    student, teacher, labels = case(seed=5)
    results = {o: fused(o, student, labels, TeacherRows(teacher), 1.0) for o in OBJECTIVES}
    values = [results[o].loss.item() for o in OBJECTIVES]
    assert len({round(v, 4) for v in values}) == 3
    assert results["kl"].loss.item() == pytest.approx(results["kl"].kl_to_base.item(), abs=1e-6)
    for o in OBJECTIVES:
        assert results[o].kl_to_base.item() == pytest.approx(
            results["kl"].kl_to_base.item(), abs=1e-5
        )


# ---- the top-k target (the cache teacher) ---------------------------------------------------
def teacher_topk(teacher, k, temperature):
    """What the cache stores: top-k log-probs at T, their ids, and the log of the remaining mass."""
    log_t = torch.log_softmax(teacher.double() / temperature, -1)
    values, ids = log_t.topk(k, dim=-1)
    tail = log_t.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values.float(), tail.float()


def reference_topk(objective, student, teacher, labels, temperature, k, threshold=0.2):
    """The bucketed KL documented in `TeacherTopK`, written out one position at a time in float64:
    the teacher's top-k buckets (lssd: the swap's buckets; mft: y in the last slot when the top-k
    does not list it, with t_y = the tail's mean token mass) and one tail bucket."""
    kls, bases = [], []
    V = teacher.shape[-1]
    for b, t in zip(*(labels != IGNORE).nonzero(as_tuple=True)):
        y = int(labels[b, t])
        tz = torch.softmax(teacher[b, t].double() / temperature, -1)
        p = torch.softmax(student[b, t].double() / temperature, -1)
        top = [int(i) for i in tz.topk(k).indices]
        probs = {i: tz[i] for i in top}
        tail = 1 - sum(probs.values())
        base = (top, probs, tail)
        m = top[0]
        if objective == "lssd":  # y takes slot 0 with t_m; m takes y's slot (or the tail)
            swapped = [y] + [m if i == y else i for i in top[1:]]
            probs = {i: tz[j] for i, j in zip(swapped, top)}
        elif objective == "mft":
            probs = dict(probs)  # the base's buckets stay as they are
            t_y = probs.get(y)
            if t_y is None:  # y replaces the last slot, whose mass joins the tail
                t_y = tail / (V - k)
                tail = tail + probs.pop(top[-1]) - t_y
                probs[y] = t_y
            if m != y:
                lam = (tz[m] - t_y + threshold) / (1 + tz[m] - t_y)
            else:
                lam = 1.0 if t_y + threshold >= 1 else threshold / (1 - t_y)
            probs = {i: (1 - lam) * q + (lam if i == y else 0) for i, q in probs.items()}
            tail = (1 - lam) * tail

        def bucketed(probs, tail, p=p):
            ids = list(probs)
            q = torch.stack([torch.as_tensor(probs[i], dtype=torch.float64) for i in ids])
            ps = p[ids]
            kl = (torch.xlogy(q, q) - q * ps.log()).sum()
            if len(ids) < V and tail > 0:
                kl = kl + tail * (torch.log(torch.as_tensor(tail)) - (1 - ps.sum()).log())
            return kl

        kls.append(bucketed(probs, tail))
        bases.append(bucketed(base[1], base[2]))
    return torch.stack(kls).mean(), torch.stack(bases).mean()


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_target_with_the_whole_vocabulary_is_exact(objective, temperature):
    student, teacher, labels = case(V=23, seed=2)
    student.requires_grad_()
    target = TeacherTopK(*teacher_topk(teacher, 23, temperature))
    got = fused(objective, student, labels, target, temperature, chunk=5)
    student64 = student.detach().double().requires_grad_()
    expected = definition(objective, student64, teacher, labels, temperature)
    assert_matches_definition(got, student, expected, student64)
    base = losses.kl_loss(student64.detach(), teacher.double(), labels, temperature)
    assert got.kl_to_base.item() == pytest.approx(base.item(), abs=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("k", [1, 4, 10])
def test_top_k_target_is_the_documented_bucketed_kl(objective, k):
    student, teacher, labels = case(V=31, seed=k)
    student.requires_grad_()
    target = TeacherTopK(*teacher_topk(teacher, k, 1.5))
    got = fused(objective, student, labels, target, 1.5)
    student64 = student.detach().double().requires_grad_()
    expected, base = reference_topk(objective, student64, teacher, labels, 1.5, k)
    assert_matches_definition(got, student, expected, student64)
    assert got.kl_to_base.item() == pytest.approx(base.item(), abs=1e-5)
    # coarsening never adds: the bucketed KL to the teacher is at most the true one
    true_base = losses.kl_loss(student64.detach(), teacher.double(), labels, 1.5)
    assert got.kl_to_base.item() <= true_base.item() + 1e-6
