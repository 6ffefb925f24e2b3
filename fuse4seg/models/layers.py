"""Layers both networks use (the leader of §3.3 and the follower of §3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuse4seg.utils import env_setting

__all__ = ["LayerNorm2d", "check_divisible", "cpu_eager", "cpu_float_eager"]


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


def cpu_eager(x: torch.Tensor, switch: str, off: str) -> bool:
    """Whether one of the package's CPU rewrites may run on ``x``: on a CPU, eager (not inside
    a graph ``torch.compile`` traces, whose compiler fuses such chains itself), and the
    environment switch ``switch`` not set to ``off`` (read last, so only where the rewrite
    would otherwise run; :func:`fuse4seg.utils.check_env_switches` reads them all)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and env_setting(switch) != off)


def cpu_float_eager(x: torch.Tensor, switch: str, off: str) -> bool:
    """:func:`cpu_eager`, for a rewrite with a hand-written backward: ``x`` also float32 or
    float64, outside CPU autocast (the rewrites compute in ``x``'s dtype; a bfloat16 map goes
    the way autograd does)."""
    return (x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and cpu_eager(x, switch, off))
