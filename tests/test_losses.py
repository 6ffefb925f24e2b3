"""The objectives of §3.5 on tensors small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fuse4seg.config import LossConfig, get_config
from fuse4seg.losses import (
    correlation,
    decomp_loss,
    grad_loss,
    lower_loss,
    physical_loss,
    recon_loss,
    sobel_magnitude,
    soft_dice_loss,
    upper_loss,
)
from fuse4seg.models import create_fusion, create_segmentation


def _two_class_example():
    # class-0 logits 0, class-1 logits [[0, ln3], [ln3, 0]] -> p1 = [[.5, .75], [.75, .5]]
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    target = torch.tensor([[[0, 1], [1, 1]]])
    return logits, target


def test_soft_dice_hand_value():
    logits, target = _two_class_example()
    # class 0: inter 0.5, sum p 1.5, sum y 1 -> Dice 1/2.5 = 0.4
    # class 1: inter 2.0, sum p 2.5, sum y 3 -> Dice 4/5.5 = 8/11
    expected = 1 - (0.4 + 8 / 11) / 2
    got = soft_dice_loss(logits, target, class_weights=(1.0, 1.0), smooth=0.0)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # w = (0.4, 1.6): 1 - (0.4 * 0.4 + 1.6 * 8/11) / 2
    got_w = soft_dice_loss(logits, target, class_weights=(0.4, 1.6), smooth=0.0)
    assert float(got_w) == pytest.approx(1 - (0.16 + 1.6 * 8 / 11) / 2, abs=1e-6)
    # weights that do not sum to C: Eq. 2 divides by C, not by the weights' sum (a review
    # found the two indistinguishable with the weights above)
    got_3 = soft_dice_loss(logits, target, class_weights=(1.0, 2.0), smooth=0.0)
    assert float(got_3) == pytest.approx(1 - (0.4 + 2 * 8 / 11) / 2, abs=1e-6)


def test_lower_loss_is_dice_plus_ce_hand_value():
    logits, target = _two_class_example()
    dice = 1 - (0.4 + 8 / 11) / 2
    ce = -(math.log(0.5) + 2 * math.log(0.75) + math.log(0.5)) / 4  # = ln(8/3) / 2
    got = lower_loss(logits, target, class_weights=(1.0, 1.0), smooth=0.0)
    assert float(got) == pytest.approx(dice + ce, abs=1e-6)


def test_dice_smoothing_makes_absent_class_perfect():
    # a class absent from both prediction (p ~ 0) and truth has Dice (0 + eps)/(0 + eps) ~ 1
    logits = torch.full((1, 4, 2, 2), -30.0)
    logits[:, 0] = 30.0
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    got = soft_dice_loss(logits, target, class_weights=(1.0, 1.0, 1.0, 1.0), smooth=1.0)
    assert float(got) == pytest.approx(0.0, abs=1e-6)


def test_lower_loss_matches_monai_dice_ce():
    import monai.losses as monai_losses
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    target = torch.randint(0, 4, (3, 8, 8))
    # MONAI's DiceCELoss with batch=True, softmax, one-hot, no smoothing on the numerator side
    ref = monai_losses.DiceCELoss(
        softmax=True, to_onehot_y=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )(logits, target[:, None])
    ours = lower_loss(logits, target, class_weights=(1.0, 1.0, 1.0, 1.0), smooth=1e-5)
    assert float(ours) == pytest.approx(float(ref), abs=1e-5)


def test_lower_loss_rejects_bad_input():
    logits = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        lower_loss(logits, torch.full((1, 2, 2), 4))
    with pytest.raises(ValueError, match=r"labels must be in 0..3, got -1..2"):
        lower_loss(logits, torch.tensor([[[0, 2], [-1, 1]]]))
    with pytest.raises(ValueError, match="target must be"):
        lower_loss(logits, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        lower_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long), class_weights=(1, 1, 1))


def test_correlation_and_decomp_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(1, 1, 2, 2)
    # centred a = [-1.5, -.5, .5, 1.5], b = [-1.5, .5, -.5, 1.5]: sum ab = 4, sum a^2 = sum b^2 = 5
    assert float(correlation(a, b)) == pytest.approx(0.8, abs=1e-6)
    assert float(correlation(a, -a)) == pytest.approx(-1.0, abs=1e-6)
    # L_decomp = CC_high^2 / (1.01 + CC_low) = (-1)^2 / 1.81
    assert float(decomp_loss(a, a, b, -a)) == pytest.approx(1 / 1.81, abs=1e-6)
    # two channels: CC per channel 1 and 0.8, averaged to 0.9; CC_high = 0.8
    low1 = torch.cat([a, a], dim=1)
    low2 = torch.cat([a, b], dim=1)
    assert float(decomp_loss(low1, a, low2, b)) == pytest.approx(0.64 / 1.91, abs=1e-6)


def test_correlation_of_constant_map_is_zero_and_has_finite_gradient():
    a = torch.ones(1, 1, 3, 3, requires_grad=True)
    b = torch.rand(1, 1, 3, 3)
    cc = correlation(a, b)
    assert float(cc.detach()) == 0.0
    cc.backward()
    assert torch.isfinite(a.grad).all()


def test_sobel_magnitude_hand_values():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4, 1).view(1, 1, 4, 4)  # vertical step
    g = sobel_magnitude(x)[0, 0]
    # G_x: 1·2·1 weights over rows, replicate padding -> 4 · (x[j+1] - x[j-1]); G_y = 0
    assert torch.equal(g, torch.tensor([0.0, 4.0, 4.0, 0.0]).repeat(4, 1))


def test_sobel_magnitude_matches_opencv():
    import cv2
    rng = np.random.default_rng(0)
    img = rng.random((9, 11)).astype(np.float64)
    gx = cv2.Sobel(img, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(img, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    ours = sobel_magnitude(torch.from_numpy(img)[None, None])[0, 0].double().numpy()
    assert np.allclose(ours, np.abs(gx) + np.abs(gy), atol=1e-5)


def test_grad_loss_hand_values():
    x1 = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4, 1).view(1, 1, 4, 4)  # |∇| 4 in cols 1, 2
    x2 = x1.transpose(-1, -2).contiguous()  # |∇| 4 in rows 1, 2
    zero = torch.zeros_like(x1)
    # target max(|∇x1|, |∇x2|) is 4 on 12 of 16 pixels; fused 0 -> mean 12·4/16 = 3
    assert float(grad_loss(zero, x1, x2)) == pytest.approx(3.0)
    # x2 = 0: target 4 on 8 pixels; fused = x1/2 has |∇| 2 there -> mean 8·2/16 = 1
    assert float(grad_loss(0.5 * x1, x1, zero)) == pytest.approx(1.0)
    assert float(grad_loss(x1, x1, zero)) == 0.0


def test_recon_loss_hand_value():
    x1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    x2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    xf = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # (x1 + x2)/2 = [[.5, 0], [.5, 1]]; differences .5, 1, -.5, -1 -> mean of squares .625
    assert float(recon_loss(xf, x1, x2)) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="same shape"):
        recon_loss(xf, x1, torch.zeros(1, 1, 3, 3))


def _upper_inputs():
    x1 = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4, 1).view(1, 1, 4, 4)
    x2 = torch.zeros_like(x1)
    xf = torch.zeros_like(x1, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(1, 1, 2, 2)
    feats = (a, a, b, -a)  # L_decomp = 1 / 1.81
    return xf, x1, x2, feats


def test_upper_loss_assembles_eq3_with_paper_weights():
    cfg = get_config("paper").loss
    assert (cfg.alpha_decomp, cfg.beta_grad, cfg.gamma_recon) == (1.0, 5.0, 0.05)
    xf, x1, x2, feats = _upper_inputs()
    seg = torch.tensor(0.7)
    total, terms = upper_loss(seg, xf, x1, x2, feats, cfg)
    decomp, grad, recon = 1 / 1.81, 2.0, 0.125  # grad: 8·4/16; recon: mean((x1/2)^2) = 2/16
    assert terms["decomp"] == pytest.approx(decomp, abs=1e-6)
    assert terms["grad"] == pytest.approx(grad)
    assert terms["recon"] == pytest.approx(recon)
    assert terms["seg"] == pytest.approx(0.7)
    expected = 0.7 + 1.0 * decomp + 5.0 * grad + 0.05 * recon
    assert float(total.detach()) == pytest.approx(expected, abs=1e-5)
    assert terms["total"] == pytest.approx(expected, abs=1e-5)
    total.backward()
    assert xf.grad is not None


def test_the_terms_as_tensors_are_the_float_terms():
    """``as_tensors=True`` (the trainer's, read back in one sync) gives the same values as
    floats, as detached 0-dim float32 tensors, NaN included, and the same total."""
    xf, x1, x2, feats = _upper_inputs()
    for cfg, f in ((get_config("paper").loss, feats), (LossConfig(use_decomp=False), None)):
        seg = torch.tensor(0.7, requires_grad=True)
        total, terms = upper_loss(seg, xf, x1, x2, f, cfg)
        total_t, tensors = upper_loss(seg, xf, x1, x2, f, cfg, as_tensors=True)
        assert list(tensors) == list(terms) == ["seg", "decomp", "grad", "recon", "total"]
        for name, value in tensors.items():
            assert torch.is_tensor(value) and value.shape == () and not value.requires_grad
            assert value.dtype == torch.float32
            assert float(value) == terms[name] or (math.isnan(terms[name]) and value.isnan())
        assert torch.equal(total_t, total) and total_t.requires_grad
    assert math.isnan(terms["decomp"])  # the second config: no features
    _, physical = physical_loss(xf, x1, x2, feats, LossConfig(), as_tensors=True)
    assert all(torch.is_tensor(v) for v in physical.values())


def test_switched_off_terms_are_logged_but_not_added():
    xf, x1, x2, feats = _upper_inputs()
    cfg = LossConfig(use_grad=False, use_decomp=False)
    total, terms = physical_loss(xf, x1, x2, feats, cfg)
    assert float(total.detach()) == pytest.approx(0.05 * 0.125)
    assert terms["grad"] == pytest.approx(2.0)  # still logged
    assert terms["decomp"] == pytest.approx(1 / 1.81, abs=1e-6)
    total, terms = physical_loss(xf, x1, x2, None, cfg)  # no features needed without decomp
    assert math.isnan(terms["decomp"])
    with pytest.raises(ValueError, match="use_decomp needs"):
        physical_loss(xf, x1, x2, None, LossConfig())


def test_segmentation_loss_reaches_leader_through_frozen_follower():
    torch.manual_seed(0)
    leader = create_fusion("fuse4seg_tiny")
    follower = create_segmentation("convnext_unet_tiny")
    follower.requires_grad_(False)  # frozen, as in the leader step of Algorithm 1
    before = {k: v.clone() for k, v in follower.state_dict().items()}
    opt = torch.optim.AdamW(leader.parameters(), lr=1e-2)
    x1, x2 = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    target = torch.randint(0, 4, (2, 32, 32))
    x_fused, _ = leader(x1, x2)
    seg = lower_loss(follower(x_fused), target)
    seg.backward()
    grads = [p.grad for p in leader.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in follower.parameters())
    opt.step()
    after = follower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_losses_run_in_float32_under_autocast():
    torch.manual_seed(0)
    x1, x2, xf = torch.rand(3, 2, 1, 16, 16).unbind(0)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    # bf16 logits, as the follower gives them under autocast: L_lower still sums in float32
    logits = logits.bfloat16()
    ref_grad, ref_lower = grad_loss(xf, x1, x2), lower_loss(logits.float(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_grad, got_lower = grad_loss(xf, x1, x2), lower_loss(logits, target)
    assert got_grad.dtype == torch.float32 and got_lower.dtype == torch.float32
    assert float(got_grad) == pytest.approx(float(ref_grad), rel=1e-6)
    assert float(got_lower) == pytest.approx(float(ref_lower), rel=1e-6)
