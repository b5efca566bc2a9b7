"""The paper's equations (`mixcpt.losses`) against an explicit float64 loop over positions
(design §1, §4, §9). tests/train/test_fused_loss.py ties the training path to these."""

from __future__ import annotations

import pytest
import torch

from mixcpt.losses import cross_entropy, logit_swap, lssd_loss, next_token_labels

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
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_lssd_loss_is_the_loop_over_positions_in_value_and_gradient(temperature):
    student, teacher, labels = random_case(seed=1)
    student.requires_grad_()
    loss = lssd_loss(student, teacher, labels, temperature)
    loss.backward()
    student64 = student.detach().double().requires_grad_()
    expected = loop_reference_lssd(student64, teacher, labels, temperature)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, atol=1e-5, rtol=0)


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
