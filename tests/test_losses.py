"""KL / KL⁻ losses and the cross-entropy on soft and hard targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nestedtrain as nt


def _kl_by_hand(student, teacher):
    p = torch.softmax(teacher, -1)
    return (p * (torch.log(p) - torch.log_softmax(student, -1))).sum(-1).mean()


def test_kl_loss_plain_matches_hand_computed():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    expected = _kl_by_hand(student, teacher)
    torch.testing.assert_close(nt.kl_loss(student, teacher), expected)
    # temperature divides both sides and multiplies the loss by T^2
    torch.testing.assert_close(
        nt.kl_loss(student, teacher, temperature=2.0), 4 * _kl_by_hand(student / 2, teacher / 2)
    )
    assert float(nt.kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_kl_loss_std_and_l2_norms_match_hand_computed():
    student = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    teacher = torch.tensor([[4.0, -2.0, 1.0, 1.0]])

    def std_norm(z):
        mean = z.mean(-1, keepdim=True)
        var = z.var(-1, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + 1e-7)

    expected_std = _kl_by_hand(3 * std_norm(student), 3 * std_norm(teacher))
    torch.testing.assert_close(
        nt.kl_loss(student, teacher, norm="std", amplitude=3.0), expected_std
    )
    l2 = lambda z: z / z.norm(dim=-1, keepdim=True)  # noqa: E731
    expected_l2 = 4 * _kl_by_hand(5 * l2(student) / 2, 5 * l2(teacher) / 2)
    got = nt.kl_loss(student, teacher, norm="l2", amplitude=5.0, temperature=2.0)
    torch.testing.assert_close(got, expected_l2)
    # KL⁻ ignores magnitude: scaling the student's logits changes nothing
    torch.testing.assert_close(
        nt.kl_loss(10 * student, teacher, norm="l2"), nt.kl_loss(student, teacher, norm="l2")
    )


def test_kl_loss_teacher_is_constant_and_errors():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    nt.kl_loss(student, teacher, norm="std").backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="unknown logit norm 'max'"):
        nt.kl_loss(student, teacher, norm="max")
    with pytest.raises(ValueError, match="temperature=0"):
        nt.kl_loss(student, teacher, temperature=0)


def test_cross_entropy_soft_and_hard_targets():
    logits = torch.randn(3, 4)
    labels = torch.tensor([0, 3, 1])
    soft = F.one_hot(labels, 4).float()
    torch.testing.assert_close(
        nt.losses.cross_entropy(logits, soft), nt.losses.cross_entropy(logits, labels)
    )
