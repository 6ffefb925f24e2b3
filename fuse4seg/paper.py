"""The numbers the paper reports (Tables 1–3), once, for the book to show beside ours.

Transcribed from the paper's tables (BraTS 2021, T1ce + FLAIR, 2-D slices; Harvard MRI-SPECT
and MRI-PET). They are the paper's results, never ours: every table that shows them labels the
rows "the paper reports". Values are (Dice, IoU) per region for Tables 1 and 3, and the seven
metrics of :data:`fuse4seg.metrics.fusion.PAPER_METRICS` (EN, SD, MI, PSNR, SF, Q^AB/F, SSIM)
for Table 2.
"""

from __future__ import annotations

__all__ = ["TABLE1", "TABLE2", "TABLE3", "paper_rows"]

REGIONS = ("NCR", "ED", "ET", "mean")

TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    # method: {region: (Dice, IoU)}; "mean" is the paper's Mean Dice / Mean IoU
    "DDFM + Seg": {"NCR": (0.765, 0.665), "ED": (0.785, 0.675), "ET": (0.800, 0.710),
                   "mean": (0.783, 0.683)},
    "BSAFusion + Seg": {"NCR": (0.775, 0.675), "ED": (0.795, 0.685), "ET": (0.810, 0.720),
                        "mean": (0.793, 0.693)},
    "MATR + Seg": {"NCR": (0.780, 0.685), "ED": (0.805, 0.690), "ET": (0.820, 0.730),
                   "mean": (0.801, 0.701)},
    "TFS-Diff + Seg": {"NCR": (0.785, 0.695), "ED": (0.815, 0.700), "ET": (0.835, 0.745),
                       "mean": (0.811, 0.713)},
    "CDDFuse + Seg": {"NCR": (0.795, 0.700), "ED": (0.825, 0.705), "ET": (0.840, 0.750),
                      "mean": (0.820, 0.718)},
    "FusionMamba + Seg": {"NCR": (0.802, 0.710), "ED": (0.835, 0.715), "ET": (0.850, 0.760),
                          "mean": (0.829, 0.728)},
    "transU-Net": {"NCR": (0.820, 0.730), "ED": (0.880, 0.745), "ET": (0.905, 0.820),
                   "mean": (0.868, 0.765)},
    "nnU-Net": {"NCR": (0.810, 0.724), "ED": (0.895, 0.750), "ET": (0.912, 0.824),
                "mean": (0.872, 0.766)},
    "CENet (2025)": {"NCR": (0.835, 0.740), "ED": (0.899, 0.759), "ET": (0.912, 0.832),
                     "mean": (0.882, 0.777)},
    "VM-UNet": {"NCR": (0.875, 0.798), "ED": (0.912, 0.826), "ET": (0.928, 0.870),
                "mean": (0.905, 0.831)},
    "Fuse4Seg": {"NCR": (0.884, 0.807), "ED": (0.908, 0.833), "ET": (0.937, 0.884),
                 "mean": (0.910, 0.841)},
}
"""Table 1: segmentation on BraTS 2021 (disjoint pipelines, direct multi-channel, Fuse4Seg)."""

TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    # keyed by our ablation names (fuse4seg.train.methods.ABLATIONS)
    "baseline": {"NCR": (0.795, 0.690), "ED": (0.815, 0.715), "ET": (0.850, 0.749),
                 "mean": (0.820, 0.718)},
    "A": {"NCR": (0.840, 0.745), "ED": (0.855, 0.755), "ET": (0.900, 0.780),
          "mean": (0.865, 0.760)},
    "B": {"NCR": (0.865, 0.775), "ED": (0.880, 0.785), "ET": (0.919, 0.825),
          "mean": (0.888, 0.795)},
    "full": {"NCR": (0.884, 0.807), "ED": (0.908, 0.833), "ET": (0.937, 0.884),
             "mean": (0.910, 0.841)},
}
"""Table 3: the ablation (Baseline (Disjoint), Variant A, Variant B, Ours (Full))."""

TABLE2: dict[str, dict[str, tuple[float, ...]]] = {
    # kind: {method: (EN, SD, MI, PSNR, SF, Q^AB/F, SSIM)}
    "SPECT-MRI": {
        "MATR": (6.812, 43.15, 2.754, 18.24, 14.32, 0.612, 0.724),
        "BSAFusion": (6.905, 44.52, 2.915, 19.55, 15.01, 0.638, 0.741),
        "CDDFuse": (7.142, 46.88, 3.210, 21.34, 16.45, 0.685, 0.778),
        "DDFM": (7.351, 49.21, 3.842, 20.12, 18.22, 0.671, 0.752),
        "FusionMamba": (7.415, 50.14, 3.755, 22.05, 17.54, 0.705, 0.792),
        "TFS-Diff": (7.450, 51.36, 4.015, 21.88, 18.95, 0.682, 0.765),
        "Fuse4Seg": (7.522, 50.85, 3.912, 24.15, 19.85, 0.742, 0.825),
    },
    "PET-MRI": {
        "MATR": (6.715, 42.10, 2.650, 17.95, 13.85, 0.595, 0.710),
        "BSAFusion": (6.820, 43.65, 2.810, 19.10, 14.65, 0.615, 0.725),
        "CDDFuse": (7.050, 45.90, 3.105, 20.85, 15.95, 0.665, 0.760),
        "DDFM": (7.250, 48.15, 3.750, 19.85, 17.85, 0.655, 0.740),
        "FusionMamba": (7.310, 49.25, 3.650, 21.55, 17.10, 0.685, 0.775),
        "TFS-Diff": (7.380, 50.60, 3.818, 21.40, 18.50, 0.660, 0.750),
        "Fuse4Seg": (7.450, 49.85, 3.920, 23.85, 19.25, 0.728, 0.812),
    },
}
"""Table 2: fusion metrics on Harvard MRI-SPECT and MRI-PET (convention not stated)."""


def paper_rows(table: dict[str, dict[str, tuple[float, float]]], names=None) -> list[dict]:
    """Rows ``{"method", "NCR_dice", "NCR_iou", ..., "mean_dice", "mean_iou"}`` of Table 1 or 3
    (only ``names`` when given), labelled "the paper reports: ..." for display."""
    rows = []
    for name, values in table.items():
        if names is not None and name not in names:
            continue
        row: dict = {"method": f"the paper reports: {name}"}
        for region in REGIONS:
            row[f"{region}_dice"], row[f"{region}_iou"] = values[region]
        rows.append(row)
    return rows
