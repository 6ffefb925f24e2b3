"""Registered networks by name: ``create_fusion("fuse4seg_paper")``, ``create_segmentation(...)``.

Every model has a ``*_tiny`` variant (CPU tests, the ``smoke`` profile, and the ``default``
profile's leader), a ``*_small`` variant (a laptop CPU: the ``default`` profile's follower)
and a ``*_paper`` variant (§3.3, §3.4 and CDDFuse's scale: 64 channels, 8 heads, 4 encoder and
4 decoder Restormer blocks, 3 INN layers in the encoder, 1 in H_high). ``tests/test_models.py``
runs forward and backward over every registered name. Parameter counts per variant: chapter 2
and chapter 3, and ``benchmarks/bench_models.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fuse4seg.models.fusion import FusionLeader
from fuse4seg.models.segmentation import ConvNeXtUNet
from fuse4seg.utils import env_setting

__all__ = [
    "FUSION_VARIANTS",
    "SEGMENTATION_VARIANTS",
    "build_leader",
    "check_model_names",
    "count_parameters",
    "create_fusion",
    "create_segmentation",
    "list_fusion_models",
    "list_segmentation_models",
    "place_leader",
]

FUSION_VARIANTS: dict[str, dict[str, Any]] = {
    # CDDFuse's scale (§3.3): C = 64, 8 heads, 4 + 4 Restormer blocks, INN 3 (encoder) + 1 (H_high)
    "fuse4seg_paper": dict(
        dim=64,
        heads=8,
        encoder_blocks=4,
        decoder_blocks=4,
        low_blocks=1,
        inn_layers=3,
        fuse_low_blocks=1,
        fuse_inn_layers=1,
    ),
    "fuse4seg_small": dict(
        dim=16,
        heads=2,
        encoder_blocks=2,
        decoder_blocks=1,
        low_blocks=1,
        inn_layers=2,
        fuse_low_blocks=1,
        fuse_inn_layers=1,
    ),
    "fuse4seg_tiny": dict(
        dim=8,
        heads=2,
        encoder_blocks=1,
        decoder_blocks=1,
        low_blocks=1,
        inn_layers=1,
        fuse_low_blocks=1,
        fuse_inn_layers=1,
    ),
}
"""Keyword arguments of :class:`~fuse4seg.models.fusion.FusionLeader` per registered name."""

SEGMENTATION_VARIANTS: dict[str, dict[str, Any]] = {
    "convnext_unet_paper": dict(
        dims=(32, 64, 96, 128, 192),
        depths=(1, 1, 2, 2),
        up_depths=(1, 1, 1, 1),
        bottleneck_blocks=2,
        heads=8,
    ),
    "convnext_unet_small": dict(
        dims=(16, 24, 32, 64, 96),
        depths=(1, 1, 1, 1),
        up_depths=(1, 1, 1, 1),
        bottleneck_blocks=1,
        heads=4,
    ),
    "convnext_unet_tiny": dict(
        dims=(8, 16, 24, 32, 48),
        depths=(1, 1, 1, 1),
        up_depths=(1, 1, 1, 1),
        bottleneck_blocks=1,
        heads=2,
    ),
}
"""Keyword arguments of :class:`~fuse4seg.models.segmentation.ConvNeXtUNet` per name."""


def list_fusion_models() -> list[str]:
    """Registered fusion leaders, sorted."""
    return sorted(FUSION_VARIANTS)


def list_segmentation_models() -> list[str]:
    """Registered segmentation followers, sorted."""
    return sorted(SEGMENTATION_VARIANTS)


def check_model_names(config) -> None:
    """Refuse a config whose ``model.fusion`` or ``model.segmentation`` names no registered
    network, naming the setting: the trainers call it before any data is prepared (building
    the network would refuse the name too, but only after that work, and without the setting's
    name)."""
    for key, names in (("fusion", FUSION_VARIANTS), ("segmentation", SEGMENTATION_VARIANTS)):
        name = getattr(config.model, key)
        if name not in names:
            raise ValueError(
                f"model.{key} {name!r}: unknown {key} model; registered: {sorted(names)}")


def create_fusion(name: str, **kwargs: Any) -> FusionLeader:
    """Build a registered fusion leader Φ.

    Args:
        name: one of :func:`list_fusion_models`.
        **kwargs: override the variant's settings, e.g. ``inn_squeeze=True`` (see
            :class:`~fuse4seg.models.fusion.FusionLeader` for every name).

    Raises:
        ValueError: unknown name or setting (the message lists the valid ones).

    Explained in chapter 2.
    """
    if name not in FUSION_VARIANTS:
        raise ValueError(f"unknown fusion model {name!r}; registered: {list_fusion_models()}")
    return _build(FusionLeader, name, {**FUSION_VARIANTS[name], **kwargs})


def create_segmentation(name: str, in_channels: int = 1, **kwargs: Any) -> ConvNeXtUNet:
    """Build a registered segmentation follower Ψ.

    Args:
        name: one of :func:`list_segmentation_models`.
        in_channels: 1 for the fused prior, 2 for the direct multi-channel baseline.
        **kwargs: override the variant's settings (``dims``, ``depths``, ``heads``, ...).

    Raises:
        ValueError: unknown name or setting.

    Explained in chapter 3.
    """
    if name not in SEGMENTATION_VARIANTS:
        raise ValueError(
            f"unknown segmentation model {name!r}; registered: {list_segmentation_models()}"
        )
    settings = {**SEGMENTATION_VARIANTS[name], **kwargs, "in_channels": in_channels}
    return _build(ConvNeXtUNet, name, settings)


def _build(cls: type[nn.Module], name: str, settings: dict[str, Any]) -> nn.Module:
    import inspect

    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}; valid: {sorted(valid)}")
    return cls(**settings)


def build_leader(config) -> FusionLeader:
    """The fusion leader Φ that ``config`` names (``model.fusion``, ``model.inn_squeeze``,
    ``model.source_skip``): the one place a config becomes a leader."""
    return create_fusion(
        config.model.fusion,
        inn_squeeze=config.model.inn_squeeze,
        source_skip=config.model.source_skip,
        anchor_range=config.model.anchor_range,
    )


def place_leader(leader: nn.Module, device: str | torch.device) -> nn.Module:
    """``leader`` on ``device``; on a CPU with its convolution weights in channels-last layout.

    On a CPU torch runs most convolutions through oneDNN, in channels-last layout when the input
    or the weight is channels-last, else in NCHW. The leader's input has one channel, so unless
    its weights are channels-last every map in it stays NCHW, where oneDNN is slow for its small
    convolutions: on a 2-vCPU Intel Xeon with two threads, the forward and backward of each of
    its 1×1 and 3×3 depthwise convolutions at the ``default`` size took 2-8× as long in NCHW,
    and the whole leader's forward and backward 1.1-1.3× as long (``fuse4seg_paper`` to
    ``fuse4seg_tiny``). With one thread the whole leader gains nothing (1.0-1.05×): torch then
    sends 1×1 convolutions to its own kernel, which is slower on channels-last maps. Measured
    by ``benchmarks/bench_layout.py`` on that machine only (figures in
    ``benchmarks/RESULTS.md``, "The leader in channels-last layout"); oneDNN picks its kernels
    by CPU, so run it where the layout matters to you. The values are the same to float
    rounding (tested).

    Only the 4-D weights change layout; the state dict's keys and values do not, and a
    checkpoint loads into either layout (a resumed optimiser's moments follow their parameters:
    :meth:`fuse4seg.train.engine.Learner.load_state_dict`). On a GPU the layout is left as it
    is (not measured there). ``FUSE4SEG_LEADER_LAYOUT=nchw`` keeps NCHW on a CPU too. The
    follower is placed with a plain ``.to(device)``: its blocks already run channels-last
    between their layer norms, and converting its weights gave no measurable change.
    """
    device = torch.device(device)
    leader = leader.to(device)
    nchw = env_setting("FUSE4SEG_LEADER_LAYOUT") == "nchw"
    if device.type == "cpu" and not nchw:
        leader = leader.to(memory_format=torch.channels_last)
    return leader


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
