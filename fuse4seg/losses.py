"""The objectives of §3.5: L_lower (Eq. 2 / §3.5.1) and the upper-level terms of Eq. 3.

Explained in chapter 2 (the physical terms: ``book/02_fusion_leader.md``) and chapter 3
(the segmentation loss: ``book/03_segmentation_follower.md``).

Conventions (where the paper leaves a choice; each also stated at its function):

- Every loss is computed in float32, whatever the autocast dtype of its inputs.
- ``lower_loss``: soft Dice sums over the batch *and* the pixels (one Dice per class for the
  whole batch, "batch Dice"), so a class absent from one slice does not dominate; the class
  weights w_c multiply each class's Dice inside ``1 - (1/C) Σ_c w_c Dice_c`` exactly as
  written in §3.5.1 (with Σ w_c = C the term stays in [0, 1]); CE is unweighted, mean over
  pixels.
- ``decomp_loss``: CC is the Pearson correlation over the pixels of each (sample, channel)
  pair, clamped to [-1, 1] and averaged over samples and channels; the square is taken of
  that average, as in CDDFuse.
- ``grad_loss``: Sobel magnitude ``|∇x| = |G_x * x| + |G_y * x|`` (the L1 form CDDFuse uses, not
  the Euclidean sqrt, whose gradient is undefined at 0), unnormalised 3×3 kernels, replicate
  padding (no false edges at the image border); ``‖·‖₁`` is the mean absolute difference.
- ``recon_loss``: ``‖·‖²₂`` is the mean squared error (§3.5.2 calls it MSE).
- The leader's physical terms are Eq. 3's ``α L_decomp + β L_grad + γ L_recon``. Eq. 1 defines
  ``λ L_fuse ≜ α L_decomp + β L_grad``, without L_recon; Eq. 3, §3.5.3 and line 15 of
  Algorithm 1 add ``γ L_recon``, and §4.1 gives γ = 0.05. We optimise Eq. 3, the objective the
  algorithm names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fuse4seg.config import LossConfig

__all__ = [
    "correlation",
    "decomp_loss",
    "grad_loss",
    "lower_loss",
    "physical_loss",
    "recon_loss",
    "sobel_magnitude",
    "soft_dice_loss",
    "upper_loss",
]


def _no_autocast(x: torch.Tensor):
    """A context that turns autocast off on ``x``'s device: every loss runs in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Lower level: the follower's segmentation loss (§3.5.1)
# ---------------------------------------------------------------------------------------------
def _check_seg(logits: torch.Tensor, target: torch.Tensor, n_weights: int) -> None:
    if logits.ndim != 4:
        raise ValueError(
            f"segmentation loss: logits must be (B, C, H, W), got {tuple(logits.shape)}"
        )
    b, c, h, w = logits.shape
    if target.shape != (b, h, w):
        raise ValueError(
            f"segmentation loss: target must be (B, H, W) = {(b, h, w)}, got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"segmentation loss: target must hold integer labels, got {target.dtype}")
    if n_weights != c:
        raise ValueError(f"segmentation loss: {n_weights} class weights for {c} classes")
    if target.numel():
        lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one host read for both
        if lo < 0 or hi >= c:
            raise ValueError(
                f"segmentation loss: target labels must be in 0..{c - 1}, got {lo}..{hi}"
            )


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float] = (0.1, 1.3, 1.3, 1.3),
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Weighted multi-class soft Dice of §3.5.1.

    ``L_Dice = 1 - (1/C) Σ_c w_c (2 Σ_i p_ci y_ci + ε) / (Σ_i p_ci + Σ_i y_ci + ε)``, with
    ``p = softmax(logits)``, ``y`` one-hot, and ``i`` running over every pixel of the batch.

    Args:
        logits: ``(B, C, H, W)`` raw scores.
        target: ``(B, H, W)`` integer labels in ``0..C-1``.
        class_weights: w_c, one per class (background first).
        smooth: ε.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: shapes, label range, or number of weights that do not match.
    """
    _check_seg(logits, target, len(class_weights))
    c = logits.shape[1]
    probs = logits.float().softmax(dim=1)  # (B, C, H, W)
    onehot = F.one_hot(target.long(), c).permute(0, 3, 1, 2).float()  # (B, H, W) -> (B, C, H, W)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)  # (C,)
    denom = probs.sum(dims) + onehot.sum(dims)  # (C,)
    dice = (2 * inter + smooth) / (denom + smooth)  # (C,)
    w = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    return 1 - (w * dice).sum() / c


def lower_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float] = (0.1, 1.3, 1.3, 1.3),
    smooth: float = 1e-5,
) -> torch.Tensor:
    """L_lower = L_Dice + L_CE (§3.5.1): the follower's loss, and L_seg of Eq. 3.

    Args:
        logits: ``(B, C, H, W)`` follower output.
        target: ``(B, H, W)`` int64 canonical labels (0 bg, 1 NCR, 2 ED, 3 ET).
        class_weights: w_c of the Dice term (``LossConfig.dice_class_weights``).
        smooth: ε of the Dice term (``LossConfig.dice_smooth``).

    Returns:
        A float32 scalar: :func:`soft_dice_loss` + unweighted mean cross-entropy.

    Raises:
        ValueError: see :func:`soft_dice_loss`.

    Explained in chapter 3.
    """
    with _no_autocast(logits):
        dice = soft_dice_loss(logits, target, class_weights, smooth)
        ce = F.cross_entropy(logits.float(), target.long())
    return dice + ce


# ---------------------------------------------------------------------------------------------
# Upper level: the physical regularisers (§3.5.2)
# ---------------------------------------------------------------------------------------------
def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation CC of two ``(B, C, H, W)`` feature maps, averaged.

    Computed over the H·W pixels of each (sample, channel) pair, clamped to [-1, 1], then
    averaged over B and C. A constant map has CC 0 (the denominator is bounded below; no NaN).

    Returns:
        A float32 scalar in [-1, 1].
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"correlation: need two (B, C, H, W) maps of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    a = a.float().flatten(2)  # (B, C, H, W) -> (B, C, HW)
    b = b.float().flatten(2)
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    num = (a * b).sum(dim=-1)  # (B, C)
    tiny = 1e-12
    den = torch.sqrt((a * a).sum(dim=-1).clamp_min(tiny)) * torch.sqrt(
        (b * b).sum(dim=-1).clamp_min(tiny)
    )
    return (num / den).clamp(-1.0, 1.0).mean()


def decomp_loss(
    f_low1: torch.Tensor, f_high1: torch.Tensor, f_low2: torch.Tensor, f_high2: torch.Tensor
) -> torch.Tensor:
    """Frequency decomposition loss (§3.5.2):
    ``L_decomp = CC(F_high¹, F_high²)² / (1.01 + CC(F_low¹, F_low²))``.

    Args:
        f_low1, f_high1, f_low2, f_high2: ``(B, C, H, W)`` encoder features, the ``feats`` the
            leader returns. CC: :func:`correlation` (per sample and channel, averaged).

    Returns:
        A float32 scalar in [0, 100] (small when high-frequency features decorrelate and
        low-frequency ones correlate).

    Explained in chapter 2.
    """
    cc_low = correlation(f_low1, f_low2)
    cc_high = correlation(f_high1, f_high2)
    return cc_high**2 / (1.01 + cc_low)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude ``|G_x * x| + |G_y * x|`` of ``(B, 1, H, W)`` images.

    Unnormalised 3×3 Sobel kernels (``G_x = [[-1,0,1],[-2,0,2],[-1,0,1]]``, ``G_y = G_xᵀ``),
    replicate padding, the L1 magnitude (as CDDFuse). Computed in float32.

    Returns:
        float32 ``(B, 1, H, W)``, ≥ 0.

    Raises:
        ValueError: input not ``(B, 1, H, W)``.

    Explained in chapter 2.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"sobel_magnitude: need (B, 1, H, W) images, got {tuple(x.shape)}")
    kx = _SOBEL_X.to(device=x.device)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    with _no_autocast(x):  # autocast would run the convolution in bf16/fp16
        padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")  # (B, 1, H+2, W+2)
        g = F.conv2d(padded, kernels)  # (B, 1, H+2, W+2) -> (B, 2, H, W)
    return g.abs().sum(dim=1, keepdim=True)  # (B, 2, H, W) -> (B, 1, H, W)


def grad_loss(x_fused: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Spatial gradient loss (§3.5.2): ``mean | |∇x_f| - max(|∇x1|, |∇x2|) |``.

    Args:
        x_fused, x1, x2: ``(B, 1, H, W)`` images. ∇: :func:`sobel_magnitude`.

    Returns:
        A float32 scalar.

    Explained in chapter 2.
    """
    _check_images(x_fused, x1, x2, "grad_loss")
    target = torch.maximum(sobel_magnitude(x1), sobel_magnitude(x2))
    return (sobel_magnitude(x_fused) - target).abs().mean()


def recon_loss(x_fused: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Physical reconstruction anchor (§3.5.2): ``mean (x_f - (x1 + x2)/2)²`` (MSE).

    The two images need not share a scale: x_f is min-max normalised per image (§3.3.2), the
    sources are scaled per volume (percentiles inside the brain), so x_avg rarely spans
    [0, 1]. With the literal leader (``model.anchor_range=False``, the ``paper`` profile) this
    term cannot reach 0 even at x_f = minmax(x_avg); with ``anchor_range`` (the ``default``
    profile) x_f is mapped onto x_avg's range and it can. Chapter 4 measures the brightening
    (1.2–1.5× on brain slices).

    Args:
        x_fused, x1, x2: ``(B, 1, H, W)`` images.

    Returns:
        A float32 scalar.

    Explained in chapter 2.
    """
    _check_images(x_fused, x1, x2, "recon_loss")
    return ((x_fused.float() - 0.5 * (x1.float() + x2.float())) ** 2).mean()


def _check_images(x_fused: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, name: str) -> None:
    if not (x_fused.shape == x1.shape == x2.shape):
        raise ValueError(
            f"{name}: x_fused {tuple(x_fused.shape)}, x1 {tuple(x1.shape)} and x2 "
            f"{tuple(x2.shape)} must have the same shape"
        )


# ---------------------------------------------------------------------------------------------
# Eq. 3: the leader's objective
# ---------------------------------------------------------------------------------------------
def _logged(value: torch.Tensor, as_tensor: bool) -> Any:
    """A loss term as it is logged: a float, or (``as_tensor``) a detached float32 0-dim tensor
    that costs no host sync until it is read."""
    value = value.detach().float()
    return value if as_tensor else float(value)


def physical_loss(
    x_fused: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    feats: Sequence[torch.Tensor] | None,
    loss_cfg: LossConfig,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``α·L_decomp + β·L_grad + γ·L_recon`` (Eq. 3 without L_seg), with the ablation switches.

    Used alone for fusion-only training (the ``disjoint_ae`` baseline, the Harvard/GFP pairs),
    and by :func:`upper_loss`.

    Args:
        x_fused, x1, x2: ``(B, 1, H, W)`` fused image and sources.
        feats: ``(f_low1, f_high1, f_low2, f_high2)`` from the leader; may be ``None`` when
            ``loss_cfg.use_decomp`` is False.
        loss_cfg: weights α, β, γ and the ``use_*`` switches.
        as_tensors: return the terms as detached 0-dim float32 tensors on x_fused's device
            instead of floats. A float costs a host sync per term on a GPU; the trainer reads
            all of an update's values back at once (:func:`fuse4seg.train.engine.fetch`).

    Returns:
        ``(total, terms)``: a float32 scalar with a graph, and a dict of floats (or tensors,
        ``as_tensors``) ``{"decomp", "grad", "recon", "total"}``. A switched-off term is still
        computed (without a graph) and logged so ablation runs stay comparable, but does not
        enter the total; ``"decomp"`` is NaN when ``feats`` is None.

    Raises:
        ValueError: ``use_decomp`` with ``feats`` None or not four tensors; bad shapes.

    Explained in chapter 2.
    """
    if feats is not None and len(feats) != 4:
        raise ValueError("physical_loss: feats must be (f_low1, f_high1, f_low2, f_high2)")
    if loss_cfg.use_decomp and feats is None:
        raise ValueError("physical_loss: use_decomp needs the leader's features (feats)")
    total = torch.zeros((), dtype=torch.float32, device=x_fused.device)
    terms: dict[str, Any] = {}
    specs = [
        (
            "decomp",
            loss_cfg.use_decomp,
            loss_cfg.alpha_decomp,
            (lambda: decomp_loss(*feats)) if feats is not None else None,
        ),
        ("grad", loss_cfg.use_grad, loss_cfg.beta_grad, lambda: grad_loss(x_fused, x1, x2)),
        ("recon", loss_cfg.use_recon, loss_cfg.gamma_recon, lambda: recon_loss(x_fused, x1, x2)),
    ]
    for name, used, weight, compute in specs:
        if compute is None:
            terms[name] = _logged(torch.full((), float("nan"), device=x_fused.device), as_tensors)
            continue
        if used:
            value = compute()
            total = total + weight * value
        else:
            with torch.no_grad():
                value = compute()
        terms[name] = _logged(value, as_tensors)
    terms["total"] = _logged(total, as_tensors)
    return total, terms


def upper_loss(
    seg_loss: torch.Tensor,
    x_fused: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    feats: Sequence[torch.Tensor] | None,
    loss_cfg: LossConfig,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The leader's objective, Eq. 3: ``L_seg|D_val + α L_decomp + β L_grad + γ L_recon``.

    Args:
        seg_loss: L_lower of the (frozen) follower on D_val (:func:`lower_loss`), a scalar whose
            graph runs through the follower into the leader.
        x_fused, x1, x2, feats, loss_cfg, as_tensors: see :func:`physical_loss`.

    Returns:
        ``(total, terms)`` with ``terms = {"seg", "decomp", "grad", "recon", "total"}``
        (floats, or detached tensors with ``as_tensors``; switched-off terms are logged but not
        added).

    Explained in chapter 2 and chapter 4.
    """
    physical, terms = physical_loss(x_fused, x1, x2, feats, loss_cfg, as_tensors)
    total = seg_loss.float() + physical
    return total, {
        "seg": _logged(seg_loss, as_tensors),
        **{k: v for k, v in terms.items() if k != "total"},
        "total": _logged(total, as_tensors),
    }
