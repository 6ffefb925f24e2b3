"""The methods of Tables 1 and 3 as data: one :class:`MethodSpec` per method and per ablation.

The trainer never compares method names: it reads the spec. Every method runs through the same
engine (:mod:`fuse4seg.train.trainer`) with the same data split, the same follower (except the
external peer ``monai_unet``) and the same schedule: the follower gets E_warm warm-up epochs and
then E_roll rollout epochs of K inner steps on D_tr per outer step (the D_tr half of the
patient-level split), so it sees exactly the slices and the number of updates it sees inside
Fuse4Seg. Only what the follower looks at, and whether and how a leader learns, changes:

=============  ==================================================================================
method         follower input
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

Ablations (Table 3) are specs too (:data:`ABLATIONS`): ``A`` = bi-level without L_decomp and
L_grad, ``B`` = bi-level + L_decomp, ``full`` = all terms, ``baseline`` = ``disjoint_ae`` without
L_decomp and L_grad (Table 3 marks both ✗ for the disjoint baseline; its leader then learns from
the reconstruction anchor alone). L_recon stays on in every variant: Table 3 does not ablate it.
This is the literal reading of the marks. The paper calls the baseline a "disjoint AutoEncoder"
and says no more: a leader fitted to x_avg is not an autoencoder of the sources, and the
paper's baseline row has the mean Dice and IoU (0.820, 0.718) of its Table 1 row for CDDFuse +
Seg (the per-class scores differ), which suggests a CDDFuse-style autoencoder trained with its
own losses. ``disjoint_ae`` (every physical loss) is the closer match to that reading.

This module imports no torch at load time (the CLI lists the methods without it).
Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from fuse4seg.config import Config

__all__ = [
    "ABLATIONS",
    "ABLATION_SWITCHES",
    "LEADER_SETTINGS",
    "METHODS",
    "SPECS",
    "AblationSpec",
    "MethodSpec",
    "build_follower",
    "check_ablation",
    "check_method_settings",
    "get_ablation",
    "get_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains and what its follower reads.

    Attributes:
        name: the method's name (run folders, tables).
        label: the row label of Tables 1 and 3.
        leader: ``None`` (no leader), ``"bilevel"`` (the leader learns from the follower on
            D_val, Algorithm 1) or ``"disjoint"`` (trained alone with the physical losses,
            then frozen).
        rule: the fixed fusion rule the follower reads when there is no leader (a key of
            :data:`fuse4seg.fusion_baselines.RULES`: ``average``, ``max``, ``concat``).
        warmup_rule: the rule the follower reads during the warm-up instead of the leader
            (Fuse4Seg: ``average``, Algorithm 1 line 2); ``None`` = the same input as later.
        follower: ``"convnext"`` (the paper's follower), ``"monai_unet"`` (external peer) or
            ``None`` (fusion-only training of the leader on image pairs).
        in_channels: follower input channels (1 for a fused image, 2 for ``[x1, x2]``).
        trains_on_ema: the follower reads the leader's EMA weights in training too (the frozen
            disjoint leader); otherwise it trains on the live leader and validation and
            inference use the EMA (Algorithm 1's output).
    """

    name: str
    label: str
    leader: str | None = None
    rule: str | None = None
    warmup_rule: str | None = None
    follower: str | None = "convnext"
    in_channels: int = 1
    trains_on_ema: bool = False

    def plan(self, warmup_epochs: int, rollout_epochs: int) -> list[tuple[str, int]]:
        """The stage plan ``[(stage, epochs), ...]``: ``fusion`` (leader alone, physical
        losses), ``warmup`` (follower on the warm-up input), ``rollout`` (K follower steps per
        outer step, plus the leader's step when it is bi-level)."""
        stages = [("warmup", warmup_epochs), ("rollout", rollout_epochs)]
        if self.leader == "disjoint":
            stages.insert(0, ("fusion", rollout_epochs))  # the leader's updates in Fuse4Seg
        return stages

    def input_rule(self, stage: str) -> str | None:
        """The fixed rule the follower reads in ``stage``; ``None`` = the leader's x_f."""
        if self.leader is None:
            return self.rule
        return self.warmup_rule if stage == "warmup" else None

    def validates_inference_input(self, stage: str) -> bool:
        """Whether validation in ``stage`` sees the input inference will use (only those
        validations may choose the best checkpoint)."""
        return stage != "fusion" and (stage != "warmup" or self.warmup_rule is None)

    @property
    def learns_leader_from_follower(self) -> bool:
        return self.leader == "bilevel"

    def reads_frozen_leader(self, stage: str) -> bool:
        """Whether the follower reads x_f of a leader that no longer changes in ``stage``
        (the disjoint pipeline after its fusion stage): x_f of a slice is then the same at
        every step, which :meth:`fuse4seg.train.bilevel.Engine.frozen_prior` keeps."""
        return (self.trains_on_ema and self.input_rule(stage) is None
                and not self.learns_leader_from_follower and stage != "fusion")


SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("fuse4seg", "Fuse4Seg (bi-level)", leader="bilevel", warmup_rule="average"),
        MethodSpec(
            "disjoint_ae", "Disjoint fusion + seg.", leader="disjoint", trains_on_ema=True
        ),
        MethodSpec("average", "Average rule", rule="average"),
        MethodSpec("max", "Maximum rule", rule="max"),
        MethodSpec("direct2ch", "Direct 2-channel", rule="concat", in_channels=2),
        MethodSpec(
            "monai_unet", "MONAI U-Net (2-channel)", rule="concat", in_channels=2,
            follower="monai_unet",
        ),
    )
}
"""Every method by name: what it trains and feeds the follower (:class:`MethodSpec`)."""
METHODS = tuple(SPECS)
"""The name of every method, in :data:`SPECS`'s order (``--method`` of ``fuse4seg train``)."""


@dataclass(frozen=True)
class AblationSpec:
    """A Table 3 variant: a method plus loss switches."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""


ABLATIONS: dict[str, AblationSpec] = {
    a.name: a
    for a in (
        AblationSpec(
            "baseline", "disjoint_ae", {"loss.use_decomp": False, "loss.use_grad": False},
            "Baseline (disjoint)",
        ),
        AblationSpec(
            "A", "fuse4seg", {"loss.use_decomp": False, "loss.use_grad": False},
            "A: bi-level, L_recon",
        ),
        AblationSpec("B", "fuse4seg", {"loss.use_grad": False}, "B: A + L_decomp"),
        AblationSpec("full", "fuse4seg", {}, "Full: B + L_grad"),
    )
}
"""Table 3's variants by name."""

ABLATION_SWITCHES = ("loss.use_decomp", "loss.use_grad", "loss.use_recon")
"""The loss switches that define a Table 3 variant: each variant turns some off and leaves the
others on (L_recon stays on in every one), so none of them may be overridden beside it."""


LEADER_SETTINGS = (
    "model.fusion", "model.anchor_range", "model.inn_squeeze", "model.source_skip",
    "train.lr_leader", "train.ema_decay", "train.ema_warmup", "train.warmup_minmax",
    "loss.alpha_decomp", "loss.beta_grad", "loss.gamma_recon", *ABLATION_SWITCHES,
)
"""Settings that only a method with a leader reads: the leader's network, its optimiser and
EMA (Eq. 4), the warm-up input put in x_f's range, and the upper-level loss (Eq. 3). A method
with a fixed rule (``average``, ``max``, ``direct2ch``, ``monai_unet``) builds no leader."""


def check_method_settings(methods: list[str], items: Mapping[str, tuple[str, Any]]) -> None:
    """Refuse a ``--set`` of a setting that none of ``methods`` reads (:data:`LEADER_SETTINGS`
    where no method has a leader): it would be recorded in the run's config, and hashed into
    its folder's name, and change nothing.

    Args:
        methods: the methods the command trains.
        items: the ``--set`` items by the dotted setting each gives, ``{dotted name: (item
            as written, value)}``, as :func:`fuse4seg.config.set_items` gives them.

    Raises:
        ValueError: the item, and the methods that would read it.
    """
    if any(get_method(m).leader is not None for m in methods):
        return
    for dotted, (item, _) in items.items():
        if dotted in LEADER_SETTINGS:
            which = " and ".join([", ".join(methods[:-1]), methods[-1]] if len(methods) > 1
                                 else methods)
            readers = " and ".join(name for name, spec in SPECS.items() if spec.leader)
            raise ValueError(
                f"--set {item}: {dotted} is a setting of the fusion leader, which {which} "
                f"{'has' if len(methods) == 1 else 'have'} none, so it would change nothing; "
                f"{readers} read it")


def _switches(variant: AblationSpec) -> dict[str, bool]:
    """The three loss switches of ``variant``: its overrides, the others on."""
    return {key: bool(variant.overrides.get(key, True)) for key in ABLATION_SWITCHES}


def _lookup(table: dict, name: str, flag: str):
    if name not in table:
        raise ValueError(f"{flag} {name!r}: unknown; choose one of {', '.join(table)}")
    return table[name]


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``.

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    return _lookup(SPECS, name, "--method")


def get_ablation(name: str) -> AblationSpec:
    """The Table 3 variant ``name``.

    Raises:
        ValueError: unknown variant (the message lists the valid ones).
    """
    return _lookup(ABLATIONS, name, "--ablation")


def check_ablation(ablation: str | None, method: str | None,
                   items: Mapping[str, tuple[str, Any]]) -> None:
    """Refuse an ``--ablation`` that other options contradict, before any work: a ``method``
    other than the variant's, or a ``--set`` of a loss switch (``items``: the ``--set`` items
    by the dotted setting each gives, ``{"loss.use_grad": ("use_grad=false", False)}``, as
    :func:`fuse4seg.config.set_items` gives them). A variant is defined by all three switches
    (:data:`ABLATION_SWITCHES`), the ones it turns off and the ones it leaves on: a ``--set
    loss.use_grad=false`` with ``--ablation full`` would train variant A under the label
    "full". ``None``: the option was not given (no ablation: nothing to check).

    Raises:
        ValueError: the conflict, naming both options (each ``--set`` item as written).
    """
    if ablation is None:
        return
    variant = get_ablation(ablation)
    if method is not None and method != variant.method:
        raise ValueError(f"--method {method} and --ablation {ablation}: the ablation trains "
                         f"{variant.method}; give one of the two")
    clash = [f"--set {items[name][0]}" for name in sorted(items) if name in ABLATION_SWITCHES]
    if clash:
        raise ValueError(f"{', '.join(clash)} and --ablation {ablation}: a Table 3 "
                         "variant fixes every loss switch itself (" + ", ".join(
                             f"{k}={str(v).lower()}" for k, v in _switches(variant).items())
                         + "); drop them or train without --ablation")


# channel widths of MONAI's UNet matched to the size of our follower variant
_MONAI_CHANNELS = {
    "tiny": (8, 16, 32, 64),
    "small": (16, 32, 64, 128),
    "paper": (32, 64, 128, 256, 512),
}


def _monai_unet(config: Config) -> nn.Module:
    """MONAI's 2-D U-Net with 2 input channels and 4 classes (the external peer).

    Widths follow the follower variant's suffix (``*_tiny``, ``*_small``, ``*_paper``) so the
    peer is of comparable size; 2 residual units per level; instance norm (MONAI's default).

    Raises:
        ImportError: MONAI is not installed (it is an optional test dependency).
    """
    from torch import nn

    from fuse4seg.models.layers import check_divisible

    try:
        from monai.networks.nets import UNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--method monai_unet needs MONAI: `pip install monai` (it is an optional "
            "dependency, listed in the `test` extra)"
        ) from exc

    class MonaiUNet(nn.Module):
        """``monai.networks.nets.UNet`` with the ``stride`` attribute the trainer checks."""

        def __init__(self, net: nn.Module, stride: int):
            super().__init__()
            self.net = net
            self.stride = stride

        def forward(self, x):
            check_divisible(x, self.stride, "monai_unet")
            return self.net(x)  # (B, 2, H, W) -> (B, 4, H, W)

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
    return MonaiUNet(net, stride=2 ** len(strides))


def build_follower(config: Config, method: str | MethodSpec) -> nn.Module:
    """The segmentation follower Ψ of a method (1 or 2 input channels, or MONAI's U-Net)."""
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if spec.follower == "monai_unet":
        return _monai_unet(config)
    from fuse4seg.models import create_segmentation

    return create_segmentation(config.model.segmentation, in_channels=spec.in_channels)
