"""Layers both networks use (the leader of §3.3 and the follower of §3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "check_divisible"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a ``(B, C, H, W)`` map (with bias)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def check_divisible(x: torch.Tensor, stride: int, who: str) -> None:
    """Raise a ``ValueError`` naming ``who`` when ``x``'s ``(H, W)`` is not a multiple of
    ``stride`` (the network's total down-sampling)."""
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(
            f"{who}: input size {h}x{w} is not divisible by its stride {stride}; pad or crop "
            f"the slices to a multiple of {stride}"
        )
