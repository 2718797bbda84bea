"""softcfg_patch.rule: confidences to per-position multipliers, against hand computations
(Step Normalization's mass, the floor, alignment, the two confidence kinds)."""
from __future__ import annotations

import pytest
import torch

from softcfg_patch.rule import STEP_NORM_EPS, aligned_multipliers, multipliers, token_confidence


def test_step_norm_removes_alpha_worth_before_the_floor():
    torch.manual_seed(0)
    conf = torch.rand(3, 200) * 0.3 + 0.01
    for alpha in (1.0, 0.5, 2.0):
        m = multipliers(conf, alpha, step_norm=True, min_weight=0.0)
        share = conf / (conf.sum(-1, keepdim=True) + STEP_NORM_EPS)
        if alpha == 1.0:  # exactly one token's worth: sum(1 - m) = sum(share) ~= 1
            torch.testing.assert_close((1 - m).sum(-1), torch.ones(3), atol=1e-4, rtol=0)
        # independent first-order check: 1 - (1 - s)^a ~= a s for small shares
        torch.testing.assert_close((1 - m).sum(-1), (alpha * share).sum(-1), atol=0.02, rtol=0.02)


def test_step_norm_floor_and_single_position():
    conf = torch.tensor([[0.7]])
    assert multipliers(conf, 1.0, True, 0.05).item() == pytest.approx(0.05)
    two = multipliers(torch.tensor([[0.3, 0.1]]), 1.0, True, 0.05)
    torch.testing.assert_close(two, torch.tensor([[1 - 0.3 / (0.4 + 1e-5), 1 - 0.1 / (0.4 + 1e-5)]]))


def test_step_norm_off_and_strength_zero():
    conf = torch.tensor([[0.2, 0.9]])
    torch.testing.assert_close(multipliers(conf, 1.0, False), torch.tensor([[0.8, 0.1]]))
    torch.testing.assert_close(multipliers(conf, 2.0, False), torch.tensor([[0.64, 0.01]]))
    assert torch.equal(multipliers(conf, 0.0, True), torch.ones(1, 2))


def test_alignment_source_and_token():
    hist = torch.tensor([[0.9, 0.2, 0.4, 0.6]])  # c_0 .. c_3, step t = 4
    src = aligned_multipliers(hist, 1.0, False, align="source")
    # positions of x_0..x_2 get c_1..c_3, x_3 (appended this step) gets 1
    torch.testing.assert_close(src, torch.tensor([[0.8, 0.6, 0.4, 1.0]]))
    tok = aligned_multipliers(hist, 1.0, False, align="token")
    torch.testing.assert_close(tok, torch.tensor([[0.1, 0.8, 0.6, 0.4]]))


def test_confidence_sampled_and_max():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(logits / 0.5, -1)
    assert token_confidence(logits, torch.tensor([1]), 0.5, "sampled").item() == pytest.approx(p[0, 1].item())
    assert token_confidence(logits, torch.tensor([1]), 0.5, "max").item() == pytest.approx(p[0, 0].item())
