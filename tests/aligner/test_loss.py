"""The KTO loss against the paper: worked example, gradient direction, saturation, edge cases, rotation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligner.loss import kl_baseline, kto_loss, rotation


def test_paper_worked_example():
    rewards = torch.tensor([0.4, 0.1, -0.2])
    kl = torch.tensor([-0.3, 0.2, -0.1])
    desirable = torch.tensor([True, False, True])
    out = kto_loss(rewards, kl, desirable, beta=0.1, lambda_d=1.0, lambda_u=1.0)
    assert out.z0.item() == 0.0
    assert out.z0_pre_clamp.item() == pytest.approx(-0.0666667, abs=1e-6)  # logged even though clamped
    assert out.losses.tolist() == pytest.approx([0.490, 0.502, 0.505], abs=1e-3)
    assert out.loss.item() == pytest.approx(0.499, abs=1e-3)
    assert out.losses.dtype == torch.float32


def test_z0_positive_is_used_and_lambdas_weight():
    rewards = torch.tensor([1.0, 1.0])
    out = kto_loss(rewards, torch.tensor([2.0, 4.0]), torch.tensor([True, False]), 0.5, 2.0, 3.0)
    assert out.z0.item() == pytest.approx(3.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.tolist() == pytest.approx([2.0 * (1 - sig(0.5 * (1 - 3))), 3.0 * (1 - sig(0.5 * (3 - 1)))])


def test_gradients_push_desirable_up_and_undesirable_down():
    rewards = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)
    out = kto_loss(rewards, torch.tensor([0.1, 0.4, -0.2, 0.3]), torch.tensor([True, True, False, False]),
                   0.1, 1.0, 1.0)
    out.loss.backward()
    g = rewards.grad
    assert (g[:2] < 0).all(), "descending the loss must raise desirable rewards"
    assert (g[2:] > 0).all(), "descending the loss must lower undesirable rewards"


def test_z0_carries_no_gradient():
    kl = torch.tensor([0.5, 1.0], requires_grad=True)
    out = kto_loss(torch.tensor([0.2, 0.1], requires_grad=True), kl, torch.tensor([True, False]), 0.1, 1, 1)
    out.loss.backward()
    assert kl.grad is None


@pytest.mark.parametrize("desirable", [True, False])
def test_saturation_prop_4_1(desirable):
    """Proposition 4.1: the gradient vanishes as the reward goes far to either side."""
    sign = 1.0 if desirable else -1.0
    grads = []
    for mag in [1.0, 10.0, 100.0, 1000.0]:
        r = torch.tensor([sign * mag], requires_grad=True)  # far on the "right" side
        kto_loss(r, torch.tensor([0.0]), torch.tensor([desirable]), 0.1, 1, 1).loss.backward()
        grads.append(abs(r.grad.item()))
        r2 = torch.tensor([-sign * mag], requires_grad=True)  # far on the "wrong" side saturates too
        kto_loss(r2, torch.tensor([0.0]), torch.tensor([desirable]), 0.1, 1, 1).loss.backward()
        grads.append(abs(r2.grad.item()))
    assert grads[0] > 0.01
    assert grads[-1] < 1e-30 and grads[-2] < 1e-30
    assert all(a >= b for a, b in zip(grads[0::2], grads[2::2], strict=False))


@pytest.mark.parametrize("mask", [[True, True, True], [False, False, False]])
def test_single_class_batch_is_finite(mask):
    out = kto_loss(torch.tensor([0.1, -5.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor(mask), 0.1, 1.3, 1)
    assert torch.isfinite(out.loss) and torch.isfinite(out.losses).all()


def test_kl_baseline_sum_and_count_reduction():
    """Uneven per-process batches: the global mean is sum/count, not the mean of means."""
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])
    def fake_all_reduce(stats):  # what all_reduce(SUM) would return with the other process holding `b`
        return stats + torch.stack([b.sum(), torch.tensor(1.0)])

    z0, pre = kl_baseline(a, fake_all_reduce)
    assert pre.item() == pytest.approx(4.0) and z0.item() == pytest.approx(4.0)
    z0n, pren = kl_baseline(torch.tensor([-1.0, -3.0]))
    assert z0n.item() == 0.0 and pren.item() == pytest.approx(-2.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=2, max_value=500))
def test_rotation_never_pairs_with_itself(n):
    partners = rotation(n)
    assert all(p != i for i, p in enumerate(partners))
    assert sorted(partners) == list(range(n)), "every completion is used exactly once"
    assert all(partners[i] == (i + 1) % n for i in range(n)), "rotation, never reversal"


def test_rotation_refuses_singletons():
    with pytest.raises(ValueError):
        rotation(1)
