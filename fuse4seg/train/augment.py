"""The follower's light data augmentation (``train.augment``; not in the paper).

The paper names no augmentation for the segmentation follower (§4.1 is silent), so no profile
switches it on by default. When on, a light, standard set is applied on the fly to every
follower update (warm-up steps and the K inner steps of the rollout; never to the leader's step
on D_val, whose loss must judge x_f itself):

- **flips** of each axis with probability ½ (axial slices are left-right symmetric enough;
  the up-down flip is a cheap extra orientation);
- **rotation** by U(−10°, 10°) and **isotropic scale** by U(0.9, 1.1), one affine per sample,
  bilinear for the image and nearest for the label, zeros outside;
- **intensity**: a multiplicative brightness ×U(0.75, 1.33) (log-uniform, so darker and
  brighter are equally likely) and a gamma U(0.8, 1.25) on the [0, ∞) intensities.

The ranges are nnU-Net's "light" defaults narrowed to small rotations. Measured by
``benchmarks/probe_collapse.py`` (``benchmarks/RESULTS.md``): in the ``default`` profile's 240
warm-up steps the augmented follower learns far less (validation mean Dice at the end of the
warm-up 0.11 against 0.63 on the phantom, 0.02 against 0.35 on six real cases, seed 0), so the
switch stays off there; it is meant for longer schedules.

Every draw comes from a ``torch.Generator`` seeded from ``(train.seed, epoch, step, k)``
(:func:`fuse4seg.train.sampling.step_generator`), so a run is repeatable and a resumed run
augments exactly as the uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment"]

ROTATION_DEG = 10.0
SCALE = (0.9, 1.1)
BRIGHTNESS = (0.75, 1.0 / 0.75)
GAMMA = (0.8, 1.25)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def augment(
    x: torch.Tensor, seg: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random augmentation per sample of a follower batch.

    Args:
        x: ``(B, C, H, W)`` follower input (x_avg, x_f or the two modalities), values ≥ 0.
        seg: ``(B, H, W)`` integer labels.
        gen: the CPU generator of this update's draws.

    Returns:
        ``(x, seg)`` of the same shapes and dtypes, on the same device.
    """
    if x.ndim != 4 or seg.ndim != 3 or x.shape[0] != seg.shape[0] or x.shape[2:] != seg.shape[1:]:
        raise ValueError(
            f"augment: need x (B, C, H, W) and seg (B, H, W) of one size, got "
            f"{tuple(x.shape)} and {tuple(seg.shape)}"
        )
    B = x.shape[0]
    flip_w = torch.rand(B, generator=gen) < 0.5
    flip_h = torch.rand(B, generator=gen) < 0.5
    angle = _uniform(B, -ROTATION_DEG, ROTATION_DEG, gen) * math.pi / 180.0
    scale = _uniform(B, *SCALE, gen)
    log_b = _uniform(B, math.log(BRIGHTNESS[0]), math.log(BRIGHTNESS[1]), gen)
    gamma = _uniform(B, *GAMMA, gen)

    # the sampling grid: output pixel -> input pixel, flips folded into the affine's signs
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sx = torch.where(flip_w, -1.0, 1.0).double()
    sy = torch.where(flip_h, -1.0, 1.0).double()
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta = theta.to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    dtype = x.dtype
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    labels = F.grid_sample(seg[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].round().to(seg.dtype)

    brightness = log_b.exp().to(device=x.device, dtype=torch.float32).view(B, 1, 1, 1)
    power = gamma.to(device=x.device, dtype=torch.float32).view(B, 1, 1, 1)
    out = out.clamp_min(0).pow(power) * brightness
    return out.to(dtype), labels
