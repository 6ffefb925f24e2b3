"""The methods that share the trainer: Fuse4Seg, its ablations and the baselines of Tables 1 and 3.

Every method runs through :class:`fuse4seg.train.bilevel.Trainer` with the same data split,
the same follower (except the external peer ``monai_unet``) and the same schedule: the follower
gets E_warm warm-up epochs and then E_roll rollout epochs of K inner steps on D_tr per outer step
(the D_tr half of the patient-level split), so it sees exactly the slices and the number of
updates it sees inside Fuse4Seg. Only what the follower looks at, and whether a leader learns,
changes:

=============  ==================================================================================
method         follower input (``prior``)
=============  ==================================================================================
fuse4seg       warm-up: x_avg = (x1 + x2)/2; rollout: x_f = Φ(x1, x2) of the leader, which takes
               one semantic step on D_val per outer step (Algorithm 1)
disjoint_ae    x_f of a leader first trained *alone* with the physical losses (E_roll epochs of
               full batches, the leader's number of updates in Fuse4Seg), then frozen — Table 3's
               "Baseline (Disjoint)"; its EMA weights feed the follower
average        x_avg, a fixed rule
max            max(x1, x2), a fixed rule (pixel-wise maximum)
direct2ch      [x1, x2] as two channels — the multi-channel paradigm, same follower with 2 inputs
monai_unet     [x1, x2] into ``monai.networks.nets.UNet`` — an external peer
=============  ==================================================================================

Ablations (Table 3) are named settings: ``A`` = bi-level without L_decomp and L_grad, ``B`` =
bi-level + L_decomp, ``full`` = all terms, ``baseline`` = ``disjoint_ae`` without L_decomp and
L_grad (Table 3 marks both ✗ for the disjoint baseline; its leader then learns from the
reconstruction anchor alone). L_recon stays on in every variant: Table 3 does not ablate it.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fuse4seg.config import Config

__all__ = [
    "ABLATIONS",
    "METHODS",
    "build_follower",
    "build_leader",
    "fixed_prior",
    "method_spec",
]

METHODS = ("fuse4seg", "disjoint_ae", "average", "max", "direct2ch", "monai_unet")

ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("disjoint_ae", {"loss.use_decomp": False, "loss.use_grad": False}),
    "A": ("fuse4seg", {"loss.use_decomp": False, "loss.use_grad": False}),
    "B": ("fuse4seg", {"loss.use_grad": False}),
    "full": ("fuse4seg", {}),
}
"""Table 3's variants: name → (method, config overrides)."""

_SPECS = {
    # method: (has a leader, leader learns from the follower, follower input channels)
    "fuse4seg": (True, True, 1),
    "disjoint_ae": (True, False, 1),
    "average": (False, False, 1),
    "max": (False, False, 1),
    "direct2ch": (False, False, 2),
    "monai_unet": (False, False, 2),
}


def method_spec(method: str) -> dict[str, Any]:
    """``{"leader": bool, "bilevel": bool, "in_channels": int}`` of a method.

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    if method not in _SPECS:
        raise ValueError(f"--method {method!r}: unknown method; choose one of {', '.join(METHODS)}")
    leader, bilevel, channels = _SPECS[method]
    return {"leader": leader, "bilevel": bilevel, "in_channels": channels}


def fixed_prior(method: str, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The follower input of a method without a learnt leader (and Fuse4Seg's warm-up x_avg).

    Args:
        method: ``"average"`` (also Fuse4Seg's warm-up), ``"max"``, ``"direct2ch"``,
            ``"monai_unet"``.
        x1, x2: ``(B, 1, H, W)`` T1ce and FLAIR in [0, 1].

    Returns:
        ``(B, 1, H, W)`` for the fusion rules, ``(B, 2, H, W)`` for the 2-channel methods.
    """
    if method in ("average", "fuse4seg"):
        return 0.5 * (x1 + x2)  # x_avg, Algorithm 1 line 2
    if method == "max":
        return torch.maximum(x1, x2)
    if method in ("direct2ch", "monai_unet"):
        return torch.cat([x1, x2], dim=1)  # (B, 1, H, W) x2 -> (B, 2, H, W)
    raise ValueError(f"method {method!r} has no fixed prior")


def build_leader(config: Config) -> nn.Module:
    """The fusion leader Φ named by ``config.model.fusion``."""
    from fuse4seg.models import create_fusion

    return create_fusion(
        config.model.fusion,
        inn_squeeze=config.model.inn_squeeze,
        source_skip=config.model.source_skip,
    )


class _MonaiUNet(nn.Module):
    """``monai.networks.nets.UNet`` with the ``stride`` attribute the trainer checks."""

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net = net
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"monai_unet: input size {h}x{w} is not divisible by its stride {self.stride}"
            )
        return self.net(x)  # (B, 2, H, W) -> (B, 4, H, W)


# channel widths of MONAI's UNet matched to the size of our follower variant
_MONAI_CHANNELS = {
    "tiny": (8, 16, 32, 64),
    "small": (16, 32, 64, 128),
    "paper": (32, 64, 128, 256, 512),
}


def build_monai_unet(config: Config) -> nn.Module:
    """MONAI's 2-D U-Net with 2 input channels and 4 classes (the external peer).

    Widths follow the follower variant's suffix (``*_tiny``, ``*_small``, ``*_paper``) so the
    peer is of comparable size; 2 residual units per level; instance norm (MONAI's default).

    Raises:
        ImportError: MONAI is not installed (it is an optional test dependency).
    """
    try:
        from monai.networks.nets import UNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--method monai_unet needs MONAI: `pip install monai` (it is an optional "
            "dependency, listed in the `test` extra)"
        ) from exc
    suffix = config.model.segmentation.rsplit("_", 1)[-1]
    channels = _MONAI_CHANNELS.get(suffix, _MONAI_CHANNELS["paper"])
    strides = (2,) * (len(channels) - 1)
    net = UNet(
        spatial_dims=2,
        in_channels=2,
        out_channels=4,
        channels=channels,
        strides=strides,
        num_res_units=2,
    )
    return _MonaiUNet(net, stride=2 ** len(strides))


def build_follower(config: Config, method: str) -> nn.Module:
    """The segmentation follower Ψ of ``method`` (1 or 2 input channels, or MONAI's U-Net)."""
    spec = method_spec(method)
    if method == "monai_unet":
        return build_monai_unet(config)
    from fuse4seg.models import create_segmentation

    return create_segmentation(config.model.segmentation, in_channels=spec["in_channels"])
