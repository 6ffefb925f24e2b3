"""Figures 3 and 4 of the paper from run folders (chapter 6).

- :func:`pick_slices`, :func:`predict_slices`, :func:`figure3` draw each method's segmentation
  beside the ground truth on the same test slices;
- :func:`feature_maps` and :func:`figure4` draw §4.3's comparison: Fuse4Seg's x_f beside
  hidden feature maps of the ``direct2ch`` follower on the same slice.

Figures use the prepared cache's test slices at the networks' input resolution (the scores of
:mod:`fuse4seg.results` use whole volumes at the input's resolution).

Explained in chapter 6 (``book/06_results.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["feature_maps", "figure3", "figure4", "pick_slices", "predict_slices"]


def pick_slices(cache: str | Path, n: int = 3, split: str = "test") -> dict[str, np.ndarray]:
    """The slice with the most tumour of each of the first ``n`` cases of ``split`` (cases
    ordered by that slice's tumour area, largest first), from the prepared cache.

    Returns:
        ``{"x1", "x2": (N, S, S) float32, "seg": (N, S, S) uint8, "case_id": (N,) str,``
        ``"slice_index": (N,) int}``.

    Raises:
        ValueError: the split has no slices.
    """
    from fuse4seg.data.slices import SliceDataset

    dataset = SliceDataset(cache, split)
    if len(dataset) == 0:
        raise ValueError(f"{cache}: no {split} slices")
    picks = []
    for case_index in range(len(dataset.case_ids)):
        items = dataset.slices_of(case_index)
        areas = [int((dataset[int(i)]["seg"] > 0).sum()) for i in items]
        best = int(np.argmax(areas))
        picks.append((areas[best], int(items[best])))
    picks = sorted(picks, key=lambda p: -p[0])[:n]
    items = [dataset[i] for _, i in picks]
    return {
        "x1": np.stack([it["x1"][0].numpy() for it in items]),
        "x2": np.stack([it["x2"][0].numpy() for it in items]),
        "seg": np.stack([it["seg"].numpy().astype(np.uint8) for it in items]),
        "case_id": np.array([it["case_id"] for it in items]),
        "slice_index": np.array([it["slice_index"] for it in items]),
    }


def predict_slices(
    run_dir: str | Path, slices: Mapping[str, np.ndarray], device: str = "auto"
) -> tuple[np.ndarray | None, np.ndarray]:
    """Fuse and segment ``slices`` (:func:`pick_slices`) with a run's best checkpoint.

    Returns:
        ``(x_f (N, S, S) or None for the 2-channel methods, labels (N, S, S) uint8)``.
    """
    from fuse4seg.inference import load_bundle, segment_slices

    bundle = load_bundle(run_dir, device=device)
    return segment_slices(bundle, slices["x1"], slices["x2"])


def figure3(slices: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray],
            title: str = "", ncols: int = 4, size: float = 2.8):
    """Figure 3: for each test slice, FLAIR, the ground truth, then each method's labels on the
    same FLAIR (NCR red, ED green, ET yellow; the orientation of chapters 1–3), ``ncols``
    panels per row (a slice may take several rows), so the panels stay large enough to read.

    Predicted labels are shown inside the brain only (where x1 or x2 is non-zero: the cache's
    slices are 0 outside the brain), as evaluation masks them
    (:func:`fuse4seg.inference.predict_volume`).

    Args:
        slices: :func:`pick_slices`.
        predictions: ``{panel title: labels (N, S, S)}``.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from fuse4seg.plotting import label_legend, overlay_labels, show

    n, panels = len(slices["x2"]), 2 + len(predictions)
    per_slice = -(-panels // ncols)
    fig, axes = plt.subplots(n * per_slice, ncols, figsize=(size * ncols,
                             size * n * per_slice + 0.6), squeeze=False)
    for r in range(n):
        x1, x2, seg = slices["x1"][r], slices["x2"][r], slices["seg"][r]
        brain = (x1 > 0) | (x2 > 0)
        axs = axes[r * per_slice : (r + 1) * per_slice].ravel()
        case = f"{slices['case_id'][r]}, slice {slices['slice_index'][r]}"
        show(axs[0], x2, f"FLAIR\n{case}", vmin=0, vmax=1)
        overlay_labels(x2, seg, ax=axs[1], title=f"ground truth\n{case}", vmin=0, vmax=1)
        for ax, (name, labels) in zip(axs[2:], predictions.items(), strict=False):
            overlay_labels(x2, np.where(brain, labels[r], 0), ax=ax, title=name, vmin=0, vmax=1)
        for ax in axs[panels:]:
            ax.set_axis_off()
    label_legend(fig, loc="upper right", ncol=3, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    # the top strip holds the title and the legend; h_pad leaves room for two-line titles
    fig.tight_layout(h_pad=2.0, rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def feature_maps(
    run_dir: str | Path,
    slices: Mapping[str, np.ndarray],
    index: int = 0,
    layers: Sequence[str] = ("enc.0", "enc.1"),
    per_layer: int = 2,
    device: str = "cpu",
) -> list[tuple[str, np.ndarray]]:
    """Hidden feature maps of a run's follower on one slice (§4.3's "black box").

    Forward hooks on the follower's modules ``layers`` (names of ``named_modules()``; the
    default: the two highest-resolution encoder stages of the ConvNeXt U-Net) keep their
    outputs; of each, the ``per_layer`` channels with the largest spatial standard deviation
    (the most structured maps) are returned.

    Returns:
        ``[(title, (h, w) array)]``, ``per_layer`` per layer.

    Raises:
        ValueError: a layer name the follower does not have.
    """
    import torch

    from fuse4seg.fusion_baselines import RULES
    from fuse4seg.inference import load_bundle
    from fuse4seg.train.methods import get_method

    bundle = load_bundle(run_dir, device=device)
    modules = dict(bundle.follower.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"feature_maps: the follower has no module {missing}")
    kept: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: kept.__setitem__(name, out.detach())
        )
        for name in layers
    ]
    x1 = torch.from_numpy(np.ascontiguousarray(slices["x1"][index : index + 1]))[:, None]
    x2 = torch.from_numpy(np.ascontiguousarray(slices["x2"][index : index + 1]))[:, None]
    x1, x2 = x1.float().to(bundle.device), x2.float().to(bundle.device)  # (1, 1, S, S)
    try:
        with torch.no_grad():
            if bundle.leader is not None:
                x_in, _ = bundle.leader(x1, x2)
            else:
                x_in = RULES[get_method(bundle.method).rule](x1, x2)
            bundle.follower(x_in)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for name in layers:
        fmap = kept[name][0].float().cpu().numpy()  # (C, h, w)
        order = np.argsort(-fmap.reshape(fmap.shape[0], -1).std(axis=1), kind="stable")
        for ch in order[:per_layer]:
            maps.append((f"{name}, channel {int(ch)}, {fmap.shape[1]}×{fmap.shape[2]}",
                         fmap[ch]))
    return maps


def figure4(slices: Mapping[str, np.ndarray], x_f: np.ndarray | None,
            maps: Sequence[tuple[str, np.ndarray]], index: int = 0, title: str = "",
            ncols: int = 4, size: float = 3.0):
    """Figure 4: top row T1ce, FLAIR, the fixed x_avg and Fuse4Seg's x_f of one slice; the rows
    below: hidden feature maps of a multi-channel follower on the same slice (each with its
    own colour range: they have no physical unit), ``ncols`` panels per row.

    Args:
        slices: :func:`pick_slices`; ``index`` picks the slice.
        x_f: ``(N, S, S)`` fused images of that slice set (``None``: the panel says so).
        maps: :func:`feature_maps`.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from fuse4seg.plotting import show

    ncols = max(ncols, 4)  # the top row's four images
    rows = 1 + -(-len(maps) // ncols)
    # each row a little taller than its square images: room for the panel titles
    fig, axes = plt.subplots(rows, ncols, figsize=(size * ncols, (size + 0.45) * rows + 0.6),
                             squeeze=False)
    x1, x2 = slices["x1"][index], slices["x2"][index]
    top = [(x1, "T1ce x1"), (x2, "FLAIR x2"), (0.5 * (x1 + x2), "x_avg (fixed rule)")]
    for ax, (image, name) in zip(axes[0], top, strict=False):
        show(ax, image, name, vmin=0, vmax=1)
    if x_f is not None:
        show(axes[0, 3], x_f[index], "Fuse4Seg x_f\n(what its follower reads)", vmin=0, vmax=1)
    else:
        axes[0, 3].text(0.5, 0.5, "no Fuse4Seg run", ha="center", va="center")
        axes[0, 3].set_axis_off()
    for ax in axes[0, 4:]:
        ax.set_axis_off()
    for i, ax in enumerate(axes[1:].ravel()):
        if i < len(maps):
            show(ax, maps[i][1], maps[i][0], cmap="magma")
        else:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(h_pad=1.5, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig
