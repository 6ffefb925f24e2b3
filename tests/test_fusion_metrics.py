"""Fusion metrics: the reference values of every convention, hand-computed cases, properties and
cross-checks against independent implementations (skimage's SSIM, 2-D convolutions)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import convolve2d

from fuse4seg.metrics import fusion as fm
from fuse4seg.metrics.fusion import (
    CONVENTIONS,
    METRICS,
    FusionMeter,
    entropy,
    fusion_metrics,
    mse,
    mutual_information,
    nan_to_none,
    psnr,
    qabf,
    scd,
    spatial_frequency,
    ssim,
    standard_deviation,
    to_uint8,
    vif,
)

RTOL = 1e-4


def _md5(x: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(x).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def images(rng):
    """Three smooth-ish random 64×64 images on 0..255 (uint8)."""
    from scipy.ndimage import gaussian_filter

    out = []
    for _ in range(3):
        x = gaussian_filter(rng.uniform(0, 255, (64, 64)), 2.0)
        x = (x - x.min()) / (x.max() - x.min()) * 255
        out.append(to_uint8(x))
    return out


# ----------------------------------------------------------------- the reference file


@pytest.fixture(scope="module")
def reference(shared_data):
    path = shared_data.parent / "reference" / "fusion_metrics_reference.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return json.loads(path.read_text())


def _reference_inputs(shared_data, entry, sources=None):
    from fuse4seg.data.pairs import read_grey

    def local(p):  # "shared/data/harvard/..." -> <shared_data>/harvard/...
        return shared_data / p.split("shared/data/", 1)[1]

    if sources is None:
        a = read_grey(local(entry["inputs"]["A_path"]))
        b = read_grey(local(entry["inputs"]["B_path"]))
    else:
        a, b = sources
    fused = {
        "F_mean": np.round((a.astype(np.float64) + b) / 2).astype(np.uint8),
        "F_max": np.maximum(a, b),
        "F_A": a,
    }
    return a, b, fused


def test_reference_md5s(shared_data, reference):
    """We read exactly the reference's pixels (float32 BT.601 luma, round half-to-even)."""
    for key, entry in reference["pairs"].items():
        a, b, fused = _reference_inputs(shared_data, entry)
        md5 = entry["inputs"]["md5_uint8"]
        assert _md5(a) == md5["A"], key
        assert _md5(b) == md5["B"], key
        for name, img in fused.items():
            assert _md5(img) == md5[name], (key, name)


def test_reference_values_every_convention(shared_data, reference):
    """Every number of the reference file, for every pair, fused image and convention."""
    bad, checked = [], 0
    for key, entry in reference["pairs"].items():
        a, b, fused = _reference_inputs(shared_data, entry)
        for fname, f in fused.items():
            for convention, expected in entry[fname].items():
                ours = fusion_metrics(f, a, b, convention, metrics=list(expected))
                for metric, value in expected.items():
                    got = ours[metric]
                    checked += 1
                    if value is None:
                        if not math.isnan(got):
                            bad.append((key, fname, convention, metric, None, got))
                    elif not math.isclose(got, value, rel_tol=RTOL, abs_tol=0.0):
                        bad.append((key, fname, convention, metric, value, got))
    assert checked > 300
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"


def _golden_triplets(shared_data):
    """(pair, fused name, F, A, B) for the reference file's six pairs and two CT-MRI test pairs
    (which the reference lacks: flat bone and background), with F_mean, F_max and F_A."""
    from fuse4seg.data.pairs import find_harvard_pairs, load_pair

    path = shared_data.parent / "reference" / "fusion_metrics_reference.json"
    for key, entry in json.loads(path.read_text())["pairs"].items():
        a, b, fused = _reference_inputs(shared_data, entry)
        for fname, f in fused.items():
            yield key, fname, f, a, b
    for paths in find_harvard_pairs(shared_data / "harvard", "CT-MRI", "test")[:2]:
        pair = load_pair(paths)
        a, b, fused = _reference_inputs(shared_data, None, (pair.a, pair.b))
        for fname, f in fused.items():
            yield f"CT-MRI/{pair.name}", fname, f, a, b


def test_values_equal_the_code_before_the_speed_work(shared_data, reference):
    """Issue 9 part 3: the faster code gives the values of the code before it (commit in the
    file, full float64 precision) to 1e-6 relative on real pairs, in every convention."""
    before = json.loads((Path(__file__).parent / "data" / "fusion_metrics_before.json").read_text())
    bad, checked = [], 0
    for key, fname, f, a, b in _golden_triplets(shared_data):
        expected = before["values"][f"{key} {fname}"]
        for convention, values in expected.items():
            ours = fusion_metrics(f, a, b, convention)
            assert list(ours) == list(values)
            for metric, value in values.items():
                got = ours[metric]
                checked += 1
                if value is None:
                    ok = math.isnan(got)
                else:
                    ok = math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-12)
                if not ok:
                    bad.append((key, fname, convention, metric, value, got))
    assert checked > 600
    assert not bad, f"{len(bad)} changed values, first: {bad[:5]}"


# ----------------------------------------------------------------- hand-computed values


def test_entropy_hand_values():
    assert entropy(np.zeros((4, 4))) == 0.0
    assert entropy(np.full((4, 4), 200, np.uint8)) == 0.0
    half = np.zeros((4, 4), np.uint8)
    half[:, 2:] = 255
    assert entropy(half) == pytest.approx(1.0)
    quarters = np.array([[0, 1], [2, 3]] * 2, np.uint8).reshape(4, 2)
    assert entropy(quarters) == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 bits
    assert entropy(np.array([[0, 0], [7, 9]], np.uint8)) == pytest.approx(1.5)


def test_sd_and_sf_hand_values():
    x = np.array([[0, 2], [0, 2]], np.uint8)
    assert standard_deviation(x) == pytest.approx(1.0)  # population: mean 1, deviations ±1
    # horizontal differences (2, 2): RF² = 4; vertical (0, 0): CF² = 0
    assert spatial_frequency(x) == pytest.approx(2.0)
    y = np.array([[0, 3, 3], [4, 3, 3]], np.uint8)
    rf2 = (9 + 0 + 1 + 0) / 4
    cf2 = (16 + 0 + 0) / 3
    assert spatial_frequency(y) == pytest.approx(math.sqrt(rf2 + cf2))


def test_mi_hand_value():
    # F is a 2-level image; A = F (MI = H(F) = 1 bit), B independent of F (MI = 0).
    f = np.array([[0, 0], [255, 255]], np.uint8)
    a = f.copy()
    b = np.array([[10, 20], [10, 20]], np.uint8)
    assert mutual_information(f, a, b) == pytest.approx(1.0)
    assert mutual_information(f, a, b, "cddfuse") == pytest.approx(math.log(2))
    assert mutual_information(f, a, b, "matlab_tang") == pytest.approx(1.0)


def test_psnr_and_mse_hand_values():
    a = np.full((8, 8), 100, np.uint8)
    f = a + 1
    assert mse(f, a, a) == pytest.approx(1.0)
    assert mse(f, a, a, "matlab_tang") == pytest.approx(1 / 255**2)
    assert psnr(f, a, a) == pytest.approx(20 * math.log10(255))
    assert psnr(f, a, a, "cddfuse") == pytest.approx(20 * math.log10(101))  # peak = max(F)
    assert psnr(f, a, a, "matlab_tang") == pytest.approx(2 * 20 * math.log10(255))
    assert psnr(a, a, a) == math.inf


def test_scd_hand_value(rng):
    a = rng.integers(0, 100, (16, 16)).astype(np.uint8)
    b = rng.integers(0, 100, (16, 16)).astype(np.uint8)
    f = a.astype(np.int64) + b  # F − B = A and F − A = B: both correlations are 1
    assert scd(f, a, b) == pytest.approx(2.0)
    assert math.isnan(scd(a, a, b))  # F − A ≡ 0: 0/0


def test_qabf_hand_value_identity_with_the_equal_gradient_quirk():
    """F = A = B: every evaluator sets G = g_F (not 1) where g_A == g_F, so Q^AB/F is the
    g-weighted mean of Γ_g / (1 + e^{k_g (g − D_g)}) · Γ_a / (1 + e^{k_a (1 − D_a)})."""
    a = np.zeros((6, 6), np.uint8)
    a[:, 3:] = 2
    gx = convolve2d(a.astype(float), [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], mode="same")
    gy = convolve2d(a.astype(float), [[1, 2, 1], [0, 0, 0], [-1, -2, -1]], mode="same")
    g = np.sqrt(gx**2 + gy**2)
    qg = 0.9994 / (1 + np.exp(-15 * (g - 0.5)))
    qa = 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))
    expected = float(np.sum(qg * qa * g) / np.sum(g))
    assert qabf(a, a, a) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------- properties


def test_ssim_of_identical_images(images):
    a = images[0]
    assert ssim(a, a, a) == pytest.approx(1.0)  # the mean of two SSIMs
    assert ssim(a, a, a, "cddfuse") == pytest.approx(2.0, rel=1e-5)  # the sum
    assert math.isnan(ssim(a, a, a, "matlab_tang"))


def test_constant_image_properties():
    c = np.full((64, 64), 77, np.uint8)
    m = fusion_metrics(c, c, c)
    assert m["EN"] == 0 and m["SD"] == 0 and m["SF"] == 0 and m["MI"] == 0
    # zero padding makes the border an edge of a non-zero constant image; a zero image has no
    # gradient anywhere, so Q^AB/F is 0/0
    z = np.zeros((64, 64), np.uint8)
    assert math.isnan(qabf(z, z, z))
    assert math.isnan(m["VIF"])  # constant reference: 0/0 in the standard convention
    assert fusion_metrics(c, c, c, "cddfuse")["VIF"] == 2.0  # the evaluator's fallback 1 + 1


def test_mi_symmetry_and_self_information(images):
    f, a, b = images
    for conv in CONVENTIONS:
        assert mutual_information(f, a, b, conv) == pytest.approx(mutual_information(f, b, a, conv))
    # MI(X, X) = H(X): with A = B = F, MI = 2 EN (bits)
    assert mutual_information(f, f, f) == pytest.approx(2 * entropy(f))
    # MI(F, A) = MI(A, F): swap the roles of the fused image and one source
    assert mutual_information(f, a, a) == pytest.approx(mutual_information(a, f, f))
    # nats = bits × ln 2
    ratio = mutual_information(f, a, b, "cddfuse") / mutual_information(f, a, b)
    assert ratio == pytest.approx(math.log(2))


def test_convention_relations(images):
    f, a, b = images
    std, cdd, mat = (fusion_metrics(f, a, b, c) for c in CONVENTIONS)
    for k in ("EN", "SD", "SF", "Qabf", "SCD", "VIF"):
        assert std[k] == pytest.approx(cdd[k]) and std[k] == pytest.approx(mat[k])
    assert mat["PSNR"] == pytest.approx(std["PSNR"] + 20 * math.log10(255))
    peak = float(np.max(f))
    assert cdd["PSNR"] == pytest.approx(std["PSNR"] + 20 * math.log10(peak / 255))


def test_metric_ranges_and_orderings(images):
    f, a, b = images
    m = fusion_metrics(f, a, b)
    assert 0 <= m["EN"] <= 8 and 0 <= m["Qabf"] <= 1 and -1 <= m["SSIM"] <= 1
    # F = A preserves A's edges best: Q^AB/F(F = A) > Q^AB/F(F = a blurred A)
    from scipy.ndimage import uniform_filter

    blurred = uniform_filter(a.astype(float), 5)
    assert qabf(a, a, b) > qabf(blurred, a, b)
    # Blurring lowers SF and SD
    assert spatial_frequency(blurred) < spatial_frequency(a)
    assert standard_deviation(blurred) < standard_deviation(a)
    # A fused image nearer to both sources has the higher PSNR
    mean_ab = (a.astype(float) + b) / 2
    assert psnr(mean_ab, a, b) > psnr(a, a, b)


def test_vif_identity_is_two(images):
    a = images[0]
    assert vif(a, a, a) == pytest.approx(2.0, rel=1e-6)


def test_integer_and_float_inputs_agree(images):
    f, a, b = images
    m1 = fusion_metrics(f, a, b)
    m2 = fusion_metrics(f.astype(np.float32), a.astype(np.float64), b.astype(np.int32))
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], nan_ok=True)


# ----------------------------------------------------------------- independent cross-checks


def test_ssim_matches_skimage(images):
    from skimage.metrics import structural_similarity

    f, a, b = images
    ref_std = 0.5 * sum(
        structural_similarity(
            f.astype(np.float64),
            s.astype(np.float64),
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for s in (a, b)
    )
    assert ssim(f, a, b) == pytest.approx(ref_std, rel=1e-10)
    ref_cdd = sum(
        structural_similarity(f.astype(np.float32), s.astype(np.float32), data_range=2)
        for s in (a, b)
    )
    assert ssim(f, a, b, "cddfuse") == pytest.approx(ref_cdd, rel=1e-6)
    assert ssim(f, a, b, "cddfuse", data_range=255) == pytest.approx(
        sum(
            structural_similarity(f.astype(np.float32), s.astype(np.float32), data_range=255)
            for s in (a, b)
        ),
        rel=1e-6,
    )


def _mi_loop(x, y):
    """MI in bits by explicit sums over the joint table (no shared code with the package)."""
    x, y = x.ravel().astype(int), y.ravel().astype(int)
    n = x.size
    joint: dict[tuple[int, int], int] = {}
    for u, v in zip(x, y, strict=True):
        joint[(u, v)] = joint.get((u, v), 0) + 1
    px = np.bincount(x, minlength=256) / n
    py = np.bincount(y, minlength=256) / n
    return sum(c / n * math.log2((c / n) / (px[u] * py[v])) for (u, v), c in joint.items())


def test_mi_matches_explicit_sum(rng):
    f = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    a = (f // 4 + rng.integers(0, 3, (20, 20))).astype(np.uint8)
    b = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    assert mutual_information(f, a, b) == pytest.approx(_mi_loop(f, a) + _mi_loop(f, b))


def _qabf_2d(f, a, b):
    """Q^AB/F written directly from Xydeas & Petrović with scipy's 2-D convolution."""
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)

    def grad(x):
        sx = convolve2d(x.astype(float), kx, mode="same")
        sy = convolve2d(x.astype(float), ky, mode="same")
        ang = np.full(x.shape, math.pi / 2)
        nz = sx != 0
        ang[nz] = np.arctan(sy[nz] / sx[nz])
        return np.sqrt(sx**2 + sy**2), ang

    gf, af = grad(f)
    num = den = 0.0
    for s in (a, b):
        gs, as_ = grad(s)
        strength = np.zeros_like(gs)
        m = gs > gf
        strength[m] = gf[m] / gs[m]
        m = gs < gf
        strength[m] = gs[m] / gf[m]
        m = gs == gf
        strength[m] = gf[m]
        orient = 1 - np.abs(as_ - af) / (math.pi / 2)
        q = (
            0.9994
            / (1 + np.exp(-15 * (strength - 0.5)))
            * 0.9879
            / (1 + np.exp(-22 * (orient - 0.8)))
        )
        num += np.sum(q * gs)
        den += np.sum(gs)
    return num / den


def test_qabf_matches_2d_convolution(images):
    f, a, b = images
    assert qabf(f, a, b) == pytest.approx(_qabf_2d(f, a, b), rel=1e-12)


def _vif_2d(ref, dist):
    """Pixel-domain multi-scale VIF with full 2-D windows and scipy.signal.convolve2d."""
    ref, dist = ref.astype(float), dist.astype(float)
    num = den = 0.0
    eps, nsq = 1e-10, 2.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        sd = n / 5
        r = np.arange(n) - (n - 1) / 2
        win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sd * sd))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 * mu1, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 * mu2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        m = s1 < eps
        g[m], sv[m], s1[m] = 0, s2[m], 0
        m = s2 < eps
        g[m], sv[m] = 0, 0
        m = g < 0
        sv[m], g[m] = s2[m], 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g * g * s1 / (sv + nsq)))
        den += np.sum(np.log10(1 + s1 / nsq))
    return num / den


def test_vif_matches_2d_convolution(images):
    f, a, b = images
    assert vif(f, a, b) == pytest.approx(_vif_2d(a, f) + _vif_2d(b, f), rel=1e-9)


# ----------------------------------------------------------------- errors, meter, helpers


def test_metric_names_are_checked_in_one_place():
    """``fusion_metrics`` and ``--metrics`` share one check of names: the unknown ones are
    named, with every valid one."""
    from fuse4seg.metrics.fusion import EXTRA_METRICS, check_metric_names

    assert check_metric_names(iter(["VIF", "MSE"])) == ["VIF", "MSE"]
    assert check_metric_names([]) == []
    with pytest.raises(ValueError) as info:
        check_metric_names(["EN", "FOO", "ssim"])
    assert str(info.value) == ("unknown metric(s) ['FOO', 'ssim']; valid: "
                               + ", ".join(METRICS + EXTRA_METRICS))


def test_bad_inputs_raise_clear_errors(images):
    f, a, b = images
    with pytest.raises(ValueError, match="convention"):
        fusion_metrics(f, a, b, "nope")
    with pytest.raises(ValueError, match="unknown metric"):
        fusion_metrics(f, a, b, metrics=["EN", "FOO"])
    with pytest.raises(ValueError, match="shape mismatch"):
        fusion_metrics(f[:-1], a, b)
    with pytest.raises(ValueError, match="2-D"):
        fusion_metrics(np.stack([f, f, f], -1), a, b)
    with pytest.raises(ValueError, match="0..255"):
        fusion_metrics(f.astype(float) * 2, a, b)
    with pytest.raises(ValueError, match="NaN"):
        fusion_metrics(np.full(f.shape, np.nan), a, b)
    with pytest.raises(ValueError, match="41x41"):
        vif(f[:32, :32], a[:32, :32], b[:32, :32])
    with pytest.warns(UserWarning, match="0..255"):
        entropy(f / 255.0)


def test_default_metric_names():
    x = np.zeros((64, 64), np.uint8)
    assert list(fusion_metrics(x, x, x))[:9] == list(METRICS)
    assert "SSIM_data_range_255" in fusion_metrics(x, x, x, "cddfuse")


def test_fusion_meter(images):
    f, a, b = images
    meter = FusionMeter("standard", metrics=["EN", "PSNR", "SCD"])
    r1 = meter.update(f, a, b, name="p1")
    r2 = meter.update(a, a, b, name="p2")  # SCD is NaN here and is skipped in the mean
    out = meter.compute()
    assert out["convention"] == "standard" and len(meter) == 2
    assert out["mean"]["EN"] == pytest.approx((r1["EN"] + r2["EN"]) / 2)
    assert out["mean"]["SCD"] == pytest.approx(r1["SCD"]) and out["count"]["SCD"] == 1
    with pytest.raises(ValueError, match="already scored"):
        meter.update(f, a, b, name="p1")
    meter.reset()
    assert len(meter) == 0


def test_to_uint8_and_nan_to_none():
    assert to_uint8(np.array([[0.5, 1.5], [254.5, 300.0]])).tolist() == [[0, 2], [254, 255]]
    assert nan_to_none({"a": float("nan"), "b": [1.0, float("inf")]}) == {
        "a": None,
        "b": [1.0, None],
    }


def test_public_functions_match_fusion_metrics(images):
    f, a, b = images
    funcs = {
        "EN": lambda c: entropy(f, c),
        "SD": lambda c: standard_deviation(f, c),
        "SF": lambda c: spatial_frequency(f, c),
        "MI": lambda c: mutual_information(f, a, b, c),
        "PSNR": lambda c: psnr(f, a, b, c),
        "Qabf": lambda c: qabf(f, a, b, c),
        "SSIM": lambda c: ssim(f, a, b, c),
        "VIF": lambda c: vif(f, a, b, c),
        "SCD": lambda c: scd(f, a, b, c),
        "MSE": lambda c: mse(f, a, b, c),
    }
    for conv in CONVENTIONS:
        m = fusion_metrics(f, a, b, conv)
        for k, fn in funcs.items():
            assert fn(conv) == pytest.approx(m[k], nan_ok=True), (conv, k)
    assert fm.PAPER_METRICS == ("EN", "SD", "MI", "PSNR", "SF", "Qabf", "SSIM")


# ----------------------------------------------------------------- the metrics CLI


@pytest.fixture()
def png_triplet(tmp_path, images):
    from PIL import Image

    paths = {}
    for sub, img in zip(("F", "A", "B"), images, strict=True):
        (tmp_path / sub).mkdir()
        for name in ("p1", "p2"):
            Image.fromarray(img if name == "p1" else img[::-1].copy()).save(
                tmp_path / sub / f"{name}.png"
            )
        paths[sub] = tmp_path / sub
    return paths


def test_metrics_cli_one_pair(png_triplet, images, capsys):
    from fuse4seg.cli import main

    f, a, b = (png_triplet[k] / "p1.png" for k in ("F", "A", "B"))
    assert (
        main(
            [
                "metrics",
                "--fused",
                str(f),
                "--a",
                str(a),
                "--b",
                str(b),
                "--json",
                "--convention",
                "cddfuse",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    expected = fusion_metrics(*images, "cddfuse")
    assert out["metrics"]["cddfuse"]["MI"] == pytest.approx(expected["MI"])
    assert main(["metrics", "--fused", str(f), "--a", str(a), "--b", str(b)]) == 0
    text = capsys.readouterr().out
    assert "convention: standard" in text and "SSIM" in text
    # --json FILE, as evaluate's and study's: the table printed, the JSON written
    target = png_triplet["F"].parent / "out" / "m.json"
    argv = ["metrics", "--fused", str(f), "--a", str(a), "--b", str(b), "--json", str(target)]
    assert main([*argv, "--convention", "cddfuse"]) == 0
    text = capsys.readouterr().out
    assert "convention: cddfuse" in text and f"wrote {target}" in text
    written = json.loads(target.read_text())
    assert written["metrics"]["cddfuse"]["MI"] == pytest.approx(expected["MI"])
    # never onto an input, checked before any image is read
    assert main([*argv[:-1], str(a)]) == 2
    assert f"--json {a}: is the input --a {a}; write the output elsewhere" in (
        capsys.readouterr().err)


def test_metrics_cli_folder_mode_writes_csv(png_triplet, images, tmp_path, capsys):
    import csv

    from fuse4seg.cli import main

    out = tmp_path / "m.csv"
    assert (
        main(
            [
                "metrics",
                "--fused",
                str(png_triplet["F"]),
                "--a",
                str(png_triplet["A"]),
                "--b",
                str(png_triplet["B"]),
                "--csv",
                str(out),
                "--convention",
                "all",
                "--metrics",
                "EN,PSNR,SCD",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and set(rows[0]) == {"name", "convention", "EN", "PSNR", "SCD"}
    p1 = next(r for r in rows if r["name"] == "p1" and r["convention"] == "matlab_tang")
    assert float(p1["PSNR"]) == pytest.approx(psnr(*images, "matlab_tang"), rel=1e-5)
    assert "mean over 2 pairs" in capsys.readouterr().out


def test_metrics_cli_errors(png_triplet, tmp_path, capsys):
    from fuse4seg.cli import main

    f, a, b = (str(png_triplet[k]) for k in ("F", "A", "B"))
    # folder mode without --csv or --json: the means, and where the per-pair values are
    assert main(["metrics", "--fused", f, "--a", a, "--b", b]) == 0
    assert "(the per-pair values: --csv FILE or --json [FILE])" in capsys.readouterr().out
    # an unwritable --csv is refused before any image is scored
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["metrics", "--fused", f, "--a", a, "--b", b, "--csv",
                 str(blocker / "x.csv")]) == 2
    assert f"--csv {blocker / 'x.csv'}: {blocker} is a file" in capsys.readouterr().err
    assert main(["metrics", "--fused", f, "--a", a, "--b", b, "--csv", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    # --csv and --json naming one file: refused, nothing written (the JSON would overwrite
    # the CSV)
    same = tmp_path / "m.out"
    assert main(["metrics", "--fused", f, "--a", a, "--b", b, "--csv", str(same),
                 "--json", str(tmp_path / "." / "m.out")]) == 2
    assert f"--csv and --json both name {same}" in capsys.readouterr().err
    assert not same.exists()
    assert (
        main(["metrics", "--fused", f + "/p1.png", "--a", a + "/nope.png", "--b", b + "/p1.png"])
        == 2
    )
    assert "nope.png" in capsys.readouterr().err
    (png_triplet["F"] / "p3.png").write_bytes((png_triplet["F"] / "p1.png").read_bytes())
    assert (
        main(["metrics", "--fused", f, "--a", a, "--b", b, "--csv", str(tmp_path / "x.csv")]) == 2
    )
    assert "p3" in capsys.readouterr().err
    assert (
        main(
            [
                "metrics",
                "--fused",
                f + "/p1.png",
                "--a",
                a + "/p1.png",
                "--b",
                b + "/p1.png",
                "--metrics",
                "EN,XX",
            ]
        )
        == 2
    )
    assert "--metrics: unknown metric(s) ['XX']; valid: EN, SD, MI" in capsys.readouterr().err
    one = ["metrics", "--fused", f + "/p1.png", "--a", a + "/p1.png", "--b", b + "/p1.png"]
    assert main([*one, "--metrics", " , "]) == 2
    assert "--metrics ' , ': no metric named; give some of EN, SD" in capsys.readouterr().err


# ----------------------------------------------------------------- the fast paths


@pytest.mark.parametrize("shape", [(64, 64), (70, 53), (256, 256)])
@pytest.mark.parametrize("n", [3, 5, 9, 11, 17])
@pytest.mark.parametrize("step", [1, 2])
def test_valid_filter_matches_convolve2d(rng, shape, n, step):
    """The compiled separable filter equals a direct 2-D 'valid' convolution (then every
    ``step``-th output), for odd, even and non-square sizes; an asymmetric or even-length
    window is refused (the filter pairs mirrored taps)."""
    w = fm._vif_window(1) if n == 17 else fm._gaussian_taps(1.5, 3.5) if n == 11 else None
    if w is None:
        w = rng.random(n)
        w = (w + w[::-1]) / 2  # symmetric, as every window here
    stack = rng.uniform(0, 255, (3, *shape))
    got = fm._valid_filter(stack, w, step=step)
    for img, out in zip(stack, got, strict=True):
        ref = convolve2d(img, np.outer(w, w), mode="valid")[::step, ::step]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="symmetric"):
        fm._valid_filter(stack, np.arange(1.0, n + 1), step=step)
    with pytest.raises(ValueError, match="odd length"):
        fm._valid_filter(stack, np.ones(4) / 4, step=step)


def test_scratch_reuse_keeps_results_exact(images, rng):
    """Reused work arrays leak nothing between calls, sizes or threads."""
    import threading

    f, a, b = images
    big = [to_uint8(rng.uniform(0, 255, (80, 96))) for _ in range(3)]
    first = {c: fusion_metrics(f, a, b, c) for c in CONVENTIONS}
    for c in CONVENTIONS:
        fusion_metrics(*big, c)
    again = {c: fusion_metrics(f, a, b, c) for c in CONVENTIONS}
    assert all(
        (math.isnan(first[c][k]) and math.isnan(again[c][k])) or first[c][k] == again[c][k]
        for c in CONVENTIONS
        for k in first[c]
    )
    results: dict[int, dict] = {}
    errors: list[BaseException] = []  # a thread's exception is otherwise only printed

    def work(i: int) -> None:
        x = (f, a, b) if i % 2 == 0 else tuple(big)
        try:
            results[i] = {c: fusion_metrics(*x, c) for c in CONVENTIONS for _ in range(3)}
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(results) == [0, 1, 2, 3]
    expected_big = {c: fusion_metrics(*big, c) for c in CONVENTIONS}
    for i, res in results.items():
        exp = first if i % 2 == 0 else expected_big
        for c in CONVENTIONS:
            for k, v in exp[c].items():
                assert (math.isnan(v) and math.isnan(res[c][k])) or res[c][k] == v, (i, c, k)


def test_vif_guards_with_flat_regions(rng):
    """Black backgrounds and flat patches (the guards' cases) against the 2-D reference."""
    f, a, b = (np.zeros((96, 96)) for _ in range(3))
    a[20:70, 10:80] = rng.integers(0, 256, (50, 70))
    b[30:90, 25:60] = 128  # flat patch in B
    f[:] = np.maximum(a, b)
    f[40:50, 40:50] = 255  # saturated block in F
    assert vif(f, a, b) == pytest.approx(_vif_2d(a, f) + _vif_2d(b, f), rel=1e-9)
    assert qabf(f, a, b) == pytest.approx(_qabf_2d(f, a, b), rel=1e-12)


def test_qabf_int16_sobel_path_equals_the_float_path(images):
    """uint8 inputs of fusion_metrics take Q^AB/F's Sobel responses in int16 (exact); the same
    images as floats take the float64 path: both equal, and equal the 2-D reference."""
    f, a, b = images
    fast = fusion_metrics(f, a, b, metrics=["Qabf"])["Qabf"]  # uint8: int16 Sobel
    slow = fusion_metrics(*(x.astype(np.float64) for x in (f, a, b)), metrics=["Qabf"])["Qabf"]
    assert fast == pytest.approx(slow, rel=1e-14)
    assert fast == pytest.approx(_qabf_2d(f, a, b), rel=1e-12)
    z = np.zeros_like(f)
    assert math.isnan(fusion_metrics(z, z, z, metrics=["Qabf"])["Qabf"])


def test_vif_scale_sums_equal_one_log_per_term(rng):
    """VIF's compiled per-scale sums (one logarithm per product of 32 terms) equal the
    reference arithmetic with one logarithm per term: on random moments with flat pixels and
    negative gains mixed in (the guards), at the largest terms images on 0..255 can give
    (σ_R² = 127.5²) and far past them (terms ~1e29, where the products must be flushed early)."""
    from fuse4seg.metrics.vif import _VIF_EPS, _VIF_SIGMA_NSQ, _vif_scale_sums

    def reference(m):
        mu_r, mu_d = m[0:2], m[2]
        s_r = np.maximum(m[3:5] - mu_r**2, 0)
        s_d = np.maximum(m[5] - mu_d**2, 0)
        s_rd = m[6:8] - mu_r * mu_d
        g = s_rd / (s_r + _VIF_EPS)
        s_v = np.maximum(s_d - g * s_rd, _VIF_EPS)
        live = s_r >= _VIF_EPS
        gained = live & (g >= 0) & (s_d >= _VIF_EPS)
        num = np.where(gained, np.log1p(g * g * s_r / (s_v + _VIF_SIGMA_NSQ)), 0.0)
        den = np.where(live, np.log1p(s_r / _VIF_SIGMA_NSQ), 0.0)
        return np.stack([num.sum(axis=(1, 2)), den.sum(axis=(1, 2))])

    for top in (1.0, 127.5**2, 1e30):
        shape = (37, 45)
        mu = rng.uniform(0, 255, (3, *shape))
        var = top * rng.random((3, *shape))
        var[:, :5] = 0.0  # flat pixels: both terms dropped where the reference is flat
        corr = rng.uniform(-0.5, 1.0, (2, *shape))  # negative gains too
        m = np.empty((8, *shape))
        m[:3] = mu
        m[3:6] = var + mu**2
        m[6:8] = corr * np.sqrt(var[:2] * var[2]) + mu[:2] * mu[2]
        got = np.zeros((2, 2))
        _vif_scale_sums(m, got)
        # 1e-9, not 1e-14: σ² = E[x²] − μ² cancels up to 5 digits at top = 1 (μ² ≈ 6e4), and
        # the compiled kernel may fuse that multiply-subtract (one rounding instead of two)
        np.testing.assert_allclose(got, reference(m), rtol=1e-9)
        assert np.isfinite(got).all()
