"""The paper's equations (`mixcpt.losses`) against an explicit float64 loop over positions
(design §1, §4, §9). tests/train/test_fused_loss.py ties the training path to these."""

from __future__ import annotations

import pytest
import torch

from mixcpt.losses import (
    cross_entropy,
    kl_loss,
    logit_swap,
    lssd_loss,
    mft_loss,
    mft_target,
    next_token_labels,
)

IGNORE = -100


def random_case(B=3, T=7, V=37, seed=0, n_ignored=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[torch.randperm(B * T, generator=g)[:n_ignored]] = IGNORE
    return student, teacher, labels


def loop_reference_lssd(student, teacher, labels, temperature):
    """Design §1 written out one position at a time, in float64: exchange z[y] and z[argmax z],
    q = softmax(z' / T), p = softmax(s / T), mean of sum q (log q - log p)."""
    kls = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE:
                continue
            z = teacher[b, t].double().clone()
            m = int(z.argmax())
            z[y], z[m] = z[m].item(), z[y].item()
            q = torch.softmax(z / temperature, -1)
            log_p = torch.log_softmax(student[b, t].double() / temperature, -1)
            kls.append((q * (q.log() - log_p)).sum())
    return torch.stack(kls).mean()


# ---- logit_swap ---------------------------------------------------------------------------
def test_logit_swap_permutes_rows_and_makes_the_label_the_argmax():
    _, teacher, labels = random_case()
    swapped = logit_swap(teacher, labels)
    keep = labels != IGNORE
    assert torch.equal(
        swapped.sort(-1).values, teacher.sort(-1).values
    )  # a permutation of each row
    assert torch.equal(swapped.argmax(-1)[keep], labels[keep])
    assert torch.equal(swapped[~keep], teacher[~keep])  # ignored positions untouched
    assert torch.equal(teacher, random_case()[1])  # the input is not modified


def test_logit_swap_leaves_rows_where_the_label_already_is_the_argmax():
    _, teacher, _ = random_case()
    labels = teacher.argmax(-1)
    assert torch.equal(logit_swap(teacher, labels), teacher)


# ---- lssd_loss ----------------------------------------------------------------------------
def assert_equal_in_value_and_gradient(loss_of, reference_of, student):
    """loss_of(student) (float32) against reference_of(the same student in float64), in value and
    in the gradient to the student."""
    student = student.detach().requires_grad_()
    loss = loss_of(student)
    loss.backward()
    student64 = student.detach().double().requires_grad_()
    expected = reference_of(student64)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_lssd_loss_is_the_loop_over_positions_in_value_and_gradient(temperature):
    student, teacher, labels = random_case(seed=1)
    assert_equal_in_value_and_gradient(
        lambda s: lssd_loss(s, teacher, labels, temperature),
        lambda s: loop_reference_lssd(s, teacher, labels, temperature),
        student,
    )


def test_lssd_loss_in_float64_equals_the_loop_to_rounding():
    student, teacher, labels = random_case(seed=2)
    got = lssd_loss(student.double(), teacher.double(), labels, 1.5)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(
        loop_reference_lssd(student, teacher, labels, 1.5).item(), abs=1e-12
    )


def test_lssd_loss_is_zero_when_student_equals_teacher_and_teacher_already_predicts_the_label():
    _, teacher, _ = random_case()
    labels = teacher.argmax(-1)
    assert lssd_loss(teacher.clone(), teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    # ...but not when the labels disagree with the teacher: the target moved.
    assert lssd_loss(teacher.clone(), teacher, (labels + 1) % teacher.shape[-1]).item() > 0.1


def test_lssd_loss_ignores_masked_positions_entirely():
    student, teacher, labels = random_case()
    changed = student.clone()
    changed[labels == IGNORE] = 1e4  # garbage where nothing is supervised
    assert lssd_loss(changed, teacher, labels).item() == pytest.approx(
        lssd_loss(student, teacher, labels).item()
    )
    assert lssd_loss(student, teacher, torch.full_like(labels, IGNORE)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lssd_loss_takes_low_precision_inputs_to_float32(dtype):
    student, teacher, labels = random_case()
    s, t = student.to(dtype), teacher.to(dtype)
    loss = lssd_loss(s, t, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(lssd_loss(s.float(), t.float(), labels).item(), abs=1e-5)


# ---- kl_loss, mft_loss ------------------------------------------------------------------------
def loop_reference(student, teacher, labels, temperature, target_of):
    """Mean over supervised positions of KL(q || softmax(s / T)) in float64, one position at a
    time, q = target_of(t, y) from t = softmax(z / T) and the label y."""
    kls = []
    for b, t in zip(*(labels != IGNORE).nonzero(as_tuple=True)):
        y = int(labels[b, t])
        q = target_of(torch.softmax(teacher[b, t].double() / temperature, -1), y)
        log_p = torch.log_softmax(student[b, t].double() / temperature, -1)
        kls.append((torch.xlogy(q, q) - q * log_p).sum())
    return torch.stack(kls).mean()


def minifinetuning_target(threshold):
    """ModelOpt's MFTLoss correction (modelopt/torch/distill/losses.py,
    `_prepare_corrected_distributions`) written out for one position, without its 1e-7: mix
    lam * onehot(y) into t so that the label leads the teacher's top-1 by the threshold, or, where
    the top-1 is the label, lifts it by the threshold (capped at 1)."""

    def target_of(t, y):
        m = int(t.argmax())
        if m != y:
            lam = (t[m] - t[y] + threshold) / (1 + t[m] - t[y])
        else:
            capped = 1.0 if t[y] > 1 - threshold else t[y] + threshold
            lam = (capped - t[m]) / (1 - t[m]) if t[m] < 1 else 1.0
        q = (1 - lam) * t
        q[y] += lam
        return q

    return target_of


def case_with_top1_labels(seed, ties=False):
    """random_case with a third of the labels the teacher's top-1 (and, with `ties`, teacher
    logits rounded so rows tie at their maximum)."""
    student, teacher, labels = random_case(seed=seed)
    if ties:
        teacher = teacher.round()
    keep = labels != IGNORE
    labels.view(-1)[::3] = torch.where(keep.view(-1)[::3], teacher.argmax(-1).view(-1)[::3], IGNORE)
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kl_loss_is_the_loop_over_positions_in_value_and_gradient(temperature):
    student, teacher, labels = case_with_top1_labels(seed=3)
    assert_equal_in_value_and_gradient(
        lambda s: kl_loss(s, teacher, labels, temperature),
        lambda s: loop_reference(s, teacher, labels, temperature, lambda t, y: t),
        student,
    )
    assert kl_loss(teacher.clone(), teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "temperature,threshold,ties", [(1.0, 0.2, False), (2.0, 0.2, True), (0.5, 0.7, False)]
)
def test_mft_loss_is_modelopts_correction_in_value_and_gradient(temperature, threshold, ties):
    student, teacher, labels = case_with_top1_labels(seed=4, ties=ties)
    target_of = minifinetuning_target(threshold)
    assert_equal_in_value_and_gradient(
        lambda s: mft_loss(s, teacher, labels, threshold, temperature),
        lambda s: loop_reference(s, teacher, labels, temperature, target_of),
        student,
    )


def test_mft_target_puts_the_label_ahead_of_the_top1_by_the_threshold():
    g = torch.Generator().manual_seed(0)
    t = torch.softmax(torch.randn(200, 11, generator=g, dtype=torch.float64) * 2, -1)
    labels = torch.randint(0, 11, (200,), generator=g)
    labels[::2] = t.argmax(-1)[::2]
    q = mft_target(t, labels, 0.2)
    i = torch.arange(200)
    top1 = t.argmax(-1)
    wrong = top1 != labels
    torch.testing.assert_close(q.sum(-1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(
        (q[i, labels] - q[i, top1])[wrong], torch.full_like(t[wrong, 0], 0.2)
    )
    lifted = (t[i, labels] + 0.2).clamp(max=1)
    torch.testing.assert_close(q[i, labels][~wrong], lifted[~wrong])
    assert torch.equal(q.argmax(-1), labels)  # the label is the target's top-1 everywhere
    # where the top-1 already leads by more than the threshold, the label is still lifted by it
    assert (q[i, labels][~wrong] >= t[i, labels][~wrong]).all()


def test_mft_target_of_a_certain_teacher_is_the_one_hot_without_nan():
    t = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    q = mft_target(t, torch.tensor([0, 0]), 0.2)
    assert torch.equal(q, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


# ---- cross_entropy, next_token_labels --------------------------------------------------------
def test_cross_entropy_matches_torch():
    student, _, labels = random_case(V=41)
    expected = torch.nn.functional.cross_entropy(
        student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    )
    assert cross_entropy(student, labels).item() == pytest.approx(expected.item(), abs=1e-5)
    assert cross_entropy(student, torch.full_like(labels, IGNORE)).item() == 0.0


def test_next_token_labels_shift_left_and_ignore_the_last_position():
    labels = torch.tensor([[5, 6, IGNORE, 8]])
    assert next_token_labels(labels).tolist() == [[6, IGNORE, 8, IGNORE]]
