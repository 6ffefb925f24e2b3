"""The networks of §3.3-3.4: registry, shapes, gradients, invertibility, clear errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from fuse4seg.config import get_config
from fuse4seg.models import (
    count_parameters,
    create_fusion,
    create_segmentation,
    list_fusion_models,
    list_segmentation_models,
    minmax_normalize,
    place_leader,
)
from fuse4seg.models.fusion import INN, AffineCoupling, haar_squeeze, haar_unsqueeze

# the heavy variants run at a small size so the whole file stays fast on two CPU cores
SIZE = {"paper": 32, "small": 32, "tiny": 32}


def _size(name: str) -> int:
    return SIZE[name.rsplit("_", 1)[1]]


def test_registry_lists_the_contract_names():
    assert {"fuse4seg_paper", "fuse4seg_small", "fuse4seg_tiny"} <= set(list_fusion_models())
    assert {"convnext_unet_paper", "convnext_unet_small", "convnext_unet_tiny"} <= set(
        list_segmentation_models()
    )


def test_profiles_name_registered_models():
    for profile in ("smoke", "default", "paper"):
        cfg = get_config(profile)
        assert cfg.model.fusion in list_fusion_models()
        assert cfg.model.segmentation in list_segmentation_models()


def test_unknown_names_and_settings_raise():
    with pytest.raises(ValueError, match="unknown fusion model"):
        create_fusion("nope")
    with pytest.raises(ValueError, match="unknown segmentation model"):
        create_segmentation("nope")
    with pytest.raises(ValueError, match="unknown setting"):
        create_fusion("fuse4seg_tiny", widht=3)


def _all_grads_reach(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient in {bad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient in {zero}"


# every registered name; the Haar squeeze option is exercised on the tiny variant
FUSION_CASES = [(n, False) for n in list_fusion_models()] + [("fuse4seg_tiny", True)]
SEG_CASES = [(n, 1) for n in list_segmentation_models()] + [("convnext_unet_tiny", 2)]


@pytest.mark.parametrize(("name", "squeeze"), FUSION_CASES)
def test_every_fusion_model_forward_backward(name, squeeze):
    torch.manual_seed(0)
    leader = create_fusion(name, inn_squeeze=squeeze)
    s = _size(name)
    x1, x2 = torch.rand(2, 1, s, s), torch.rand(2, 1, s, s)
    x_fused, feats = leader(x1, x2)
    assert x_fused.shape == (2, 1, s, s) and x_fused.dtype == torch.float32
    assert float(x_fused.detach().min()) == 0.0
    assert abs(float(x_fused.detach().max()) - 1.0) < 1e-6
    assert len(feats) == 4
    for f in feats:
        assert f.shape == (2, leader.dim, s, s)
    loss = (x_fused * torch.rand_like(x_fused)).sum() + sum((f**2).mean() for f in feats)
    loss.backward()
    assert torch.isfinite(loss)
    _all_grads_reach(leader)
    assert leader.stride == (2 if squeeze else 1)


@pytest.mark.parametrize(("name", "in_channels"), SEG_CASES)
def test_every_segmentation_model_forward_backward(name, in_channels):
    torch.manual_seed(0)
    follower = create_segmentation(name, in_channels=in_channels)
    s = _size(name)
    assert s % follower.stride == 0
    x = torch.rand(2, in_channels, s, s)
    logits = follower(x)
    assert logits.shape == (2, 4, s, s)
    target = torch.randint(0, 4, (2, s, s))
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    _all_grads_reach(follower)


def test_follower_rejects_bad_sizes_and_channels():
    follower = create_segmentation("convnext_unet_tiny")
    with pytest.raises(ValueError, match="divisible by its stride 16"):
        follower(torch.rand(1, 1, 40, 40))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, H, W\)"):
        follower(torch.rand(1, 2, 32, 32))


def test_leader_rejects_bad_inputs():
    leader = create_fusion("fuse4seg_tiny", inn_squeeze=True)
    with pytest.raises(ValueError, match="stride 2"):
        leader(torch.rand(1, 1, 15, 16), torch.rand(1, 1, 15, 16))
    with pytest.raises(ValueError, match="same shape"):
        leader(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        leader(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16))


def test_odd_sizes_work_without_squeeze():
    leader = create_fusion("fuse4seg_tiny")
    x_fused, _ = leader(torch.rand(1, 1, 13, 17), torch.rand(1, 1, 13, 17))
    assert x_fused.shape == (1, 1, 13, 17)


@pytest.mark.parametrize("squeeze", [False, True])
def test_inn_is_exactly_invertible_float64(squeeze):
    torch.manual_seed(0)
    inn = INN(8, layers=3, squeeze=squeeze).double()
    z = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = inn(z)
        back = inn.inverse(y)
    assert not torch.allclose(y, z)  # it does transform
    assert torch.allclose(back, z, atol=1e-5, rtol=0)
    assert float((back - z).abs().max()) < 1e-10


def test_coupling_log_scale_is_bounded():
    torch.manual_seed(0)
    block = AffineCoupling(4, clamp=2.0)
    z2 = torch.randn(1, 2, 8, 8) * 1e4  # would overflow exp() without the bound
    s = block._log_scale(z2)
    assert float(s.detach().abs().max()) <= 2.0
    with torch.no_grad():
        out = block(torch.randn(1, 4, 8, 8) * 1e4)
    assert torch.isfinite(out).all()


def test_haar_squeeze_hand_values_and_inverse():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    y = haar_squeeze(x).flatten()
    # LL = (1+2+3+4)/2, LH = (1-2+3-4)/2, HL = (1+2-3-4)/2, HH = (1-2-3+4)/2
    assert torch.allclose(y, torch.tensor([5.0, -1.0, -2.0, 0.0]))
    z = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    assert torch.allclose(haar_unsqueeze(haar_squeeze(z)), z, atol=1e-12)
    # orthonormal: energy is preserved
    assert torch.allclose((haar_squeeze(z) ** 2).sum(), (z**2).sum())


def test_minmax_normalize_range_and_constant_image():
    y = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[-1.0, -1.0], [-1.0, 3.0]]]])
    out = minmax_normalize(y)
    expected = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    assert torch.allclose(out, expected)
    const = torch.full((1, 1, 4, 4), 7.0, requires_grad=True)
    out = minmax_normalize(const)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(const.grad).all()


def test_leader_on_constant_images_is_finite():
    leader = create_fusion("fuse4seg_tiny")
    x = torch.zeros(1, 1, 16, 16)
    x_fused, feats = leader(x, x)
    assert torch.isfinite(x_fused).all() and all(torch.isfinite(f).all() for f in feats)


def test_paper_variant_scale():
    leader = create_fusion("fuse4seg_paper")
    assert leader.dim == 64
    assert len(leader.encoder) == 4 and len(leader.decoder) == 4
    assert len(leader.high.blocks) == 3 and len(leader.fuse_high.blocks) == 1
    assert leader.encoder[0].attn.heads == 8
    assert leader.inn_squeeze is False  # the paper profile's choice, see fuse4seg.models.fusion
    follower = create_segmentation("convnext_unet_paper")
    # "a follower of comparable weight": same order of magnitude as the leader
    ratio = count_parameters(follower) / count_parameters(leader)
    assert 1 <= ratio <= 10


def test_source_skip_anchors_the_polarity():
    """With the decoder's residual at zero, x_f is exactly minmax((x1 + x2)/2); without the
    skip the output does not depend on x_avg that way (the literal 'anchor-free' reading)."""
    from fuse4seg.models import create_fusion, minmax_normalize

    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    leader = create_fusion("fuse4seg_tiny", source_skip=True)
    torch.nn.init.zeros_(leader.head[-1].weight)
    x_fused, _ = leader(x1, x2)
    assert torch.allclose(x_fused, minmax_normalize(0.5 * (x1 + x2)), atol=1e-6)
    literal = create_fusion("fuse4seg_tiny", source_skip=False)
    torch.nn.init.zeros_(literal.head[-1].weight)
    flat, _ = literal(x1, x2)
    assert torch.all(flat == 0)  # a constant decoder output normalises to 0, not to x_avg


def test_untrained_leader_starts_near_the_warmup_prior():
    """With the skip, a fresh leader outputs ≈ minmax(x_avg): the follower's warm-up input."""
    from fuse4seg.models import create_fusion, minmax_normalize

    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    for name in ("fuse4seg_tiny", "fuse4seg_small"):
        x_fused, _ = create_fusion(name)(x1, x2)
        gap = (x_fused - minmax_normalize(0.5 * (x1 + x2))).abs().mean()
        assert gap < 0.01, (name, float(gap))


def test_anchor_range_puts_x_f_on_the_warmup_priors_scale():
    """model.anchor_range: x_f spans exactly [min, max] of x_avg per image (so a zero residual
    gives x_avg itself), gradients still flow, and the paper's reading stays min-max."""
    from fuse4seg.config import get_config
    from fuse4seg.models import build_leader, create_fusion

    torch.manual_seed(0)
    x1, x2 = 0.6 * torch.rand(2, 1, 16, 16), 0.3 * torch.rand(2, 1, 16, 16)
    x_avg = 0.5 * (x1 + x2)
    leader = create_fusion("fuse4seg_tiny", anchor_range=True)
    torch.nn.init.zeros_(leader.head[-1].weight)
    x_fused, _ = leader(x1, x2)
    assert torch.allclose(x_fused, x_avg, atol=1e-6)
    fresh = create_fusion("fuse4seg_tiny", anchor_range=True)
    y, _ = fresh(x1, x2)
    assert torch.allclose(y.amin(dim=(1, 2, 3)), x_avg.amin(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(y.amax(dim=(1, 2, 3)), x_avg.amax(dim=(1, 2, 3)), atol=1e-6)
    y.sum().backward()
    assert fresh.head[-1].weight.grad.abs().sum() > 0
    assert not build_leader(get_config("paper")).anchor_range


def _grn_formula(x, gamma, beta, eps):
    """ConvNeXt V2's GRN as its paper writes it (autograd differentiates it)."""
    g = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)
    n = (g / (g.mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return gamma * (x * n) + beta + x


def test_grn_gradients_are_exact_float64():
    from fuse4seg.models.segmentation import _GRNFunction

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=gen)
    x[:, :, :, 3] = 0  # an all-zero channel: its norm is 0, its gradient must stay finite
    gamma = torch.randn(7, dtype=torch.float64, generator=gen)
    beta = torch.randn(7, dtype=torch.float64, generator=gen)
    inputs = tuple(t.requires_grad_() for t in (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda a, b, c: _GRNFunction.apply(a, b, c, 1e-6), inputs)


def test_grn_equals_the_formula_forward_and_backward():
    from fuse4seg.models.segmentation import GRN

    gen = torch.Generator().manual_seed(1)
    grn = GRN(64)
    with torch.no_grad():  # trained-looking parameters (both start at zero)
        grn.gamma.copy_(torch.randn(64, generator=gen))
        grn.beta.copy_(torch.randn(64, generator=gen))
    x = torch.randn(4, 20, 20, 64, generator=gen).requires_grad_()
    dy = torch.randn(4, 20, 20, 64, generator=gen)
    ours = grn(x)
    grads = torch.autograd.grad(ours, (x, grn.gamma, grn.beta), dy)
    ref = _grn_formula(x, grn.gamma, grn.beta, grn.eps)
    ref_grads = torch.autograd.grad(ref, (x, grn.gamma, grn.beta), dy)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="GRN"):
        grn(torch.zeros(2, 3, 4))


def test_grn_keeps_the_input_dtype_of_its_gradient_under_bf16():
    from fuse4seg.models.segmentation import GRN

    gen = torch.Generator().manual_seed(0)
    grn = GRN(8)
    with torch.no_grad():  # non-zero parameters: with both at zero GRN is the identity
        grn.gamma.copy_(torch.randn(8, generator=gen))
        grn.beta.copy_(torch.randn(8, generator=gen))
    x = torch.randn(2, 4, 4, 8, generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(2, 4, 4, 8, generator=gen).bfloat16()
    y = grn(x)
    ref = _grn_formula(x, grn.gamma, grn.beta, grn.eps)
    assert y.dtype == ref.dtype
    grads = torch.autograd.grad(y, (x, grn.gamma, grn.beta), dy)
    ref_grads = torch.autograd.grad(ref, (x, grn.gamma, grn.beta), dy)
    for a, b in zip(grads, ref_grads, strict=True):  # the values, to bf16's precision
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_grn_runs_the_formula_when_compiled(monkeypatch):
    """torch.compile cannot trace the hand-written GRN; a compiled graph gets the formula."""
    from fuse4seg.models import segmentation

    grn = segmentation.GRN(8)
    x = torch.randn(2, 4, 4, 8)
    monkeypatch.setattr(segmentation._GRNFunction, "apply", None)  # must not be called
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(grn(x), _grn_formula(x, grn.gamma, grn.beta, grn.eps))


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_place_leader_makes_the_weights_channels_last_on_a_cpu_with_the_same_values(monkeypatch):
    """On a CPU the leader's convolution weights go channels-last (oneDNN's fast layout for its
    small convolutions); its output, features and gradients are those of NCHW to float
    rounding, its state dict has the same keys and values and loads into either layout, and
    ``FUSE4SEG_LEADER_LAYOUT=nchw`` keeps NCHW."""
    monkeypatch.delenv("FUSE4SEG_LEADER_LAYOUT", raising=False)
    torch.manual_seed(0)
    nchw = create_fusion("fuse4seg_tiny", inn_squeeze=True)
    cl = place_leader(copy.deepcopy(nchw), "cpu")
    weights = [w for w in cl.parameters() if w.ndim == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    # (a 1×1 or one-input-channel weight has the same strides in both layouts; a 3×3 does not)
    assert _channels_last(cl.head[0].weight)
    assert not any(_channels_last(w) for w in nchw.parameters())
    assert all(w.is_contiguous() for w in nchw.parameters())
    x1, x2 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    (y0, f0), (y1, f1) = nchw(x1, x2), cl(x1, x2)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(f0, f1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    (y0.square().sum() + sum(f.sum() for f in f0)).backward()
    (y1.square().sum() + sum(f.sum() for f in f1)).backward()
    # float rounding of sums whose terms reach |grad| ~ 1e3: an absolute tolerance scaled by
    # each gradient's largest entry (on an AMD EPYC up to 6.2e-7 of it; a fixed 1e-5 failed there)
    for (name, a), b in zip(nchw.named_parameters(), cl.parameters(), strict=True):
        scale = max(1.0, float(a.grad.abs().max()))
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    state = cl.state_dict()
    assert list(state) == list(nchw.state_dict())
    assert all(torch.equal(state[k], v) for k, v in nchw.state_dict().items())
    fresh = create_fusion("fuse4seg_tiny", inn_squeeze=True)
    fresh.load_state_dict(state)  # a channels-last checkpoint into an NCHW leader
    torch.testing.assert_close(fresh(x1, x2)[0], y0, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FUSE4SEG_LEADER_LAYOUT", "nchw")
    kept = place_leader(create_fusion("fuse4seg_tiny"), "cpu")
    assert all(w.is_contiguous() for w in kept.parameters())


def test_training_and_served_leaders_are_channels_last_on_a_cpu(monkeypatch):
    """The engine's leader and its EMA copy (what validation fuses with) share the layout."""
    from fuse4seg.train.bilevel import Engine

    monkeypatch.delenv("FUSE4SEG_LEADER_LAYOUT", raising=False)
    engine = Engine(get_config("smoke"), "fuse4seg", torch.device("cpu"), steps_per_epoch=1)
    assert _channels_last(engine.leader_module.head[0].weight)
    assert _channels_last(engine.ema.module.head[0].weight)
    assert not _channels_last(engine.follower_module.down[0].conv.weight)  # the follower: as built


def test_bench_layout_times_every_convolution_of_the_leader_in_both_layouts(capsys):
    from bench_scripts import load

    bench = load("bench_layout")
    assert bench.main(["--size", "8", "--batch", "1", "--rounds", "1", "--repeats", "1",
                       "--variants", "fuse4seg_tiny"]) == 0
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and r[2].isdigit()]
    leader = create_fusion("fuse4seg_tiny")
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in leader.modules())
    assert sum(int(r[3]) for r in rows) == convs  # each module called once per forward
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--variants", "fuse4seg_huge"])
    assert "fuse4seg_huge" in capsys.readouterr().err


def test_the_convnext_block_cpu_rewrites_give_autograd_s_values(monkeypatch):
    """The ConvNeXt block's CPU rewrites (GRN folded into pw2, ``_FoldedMLP``; the depthwise
    gradients as forward convolutions, ``_DepthwiseByForward``), each alone and together, give
    the block's output and gradients as autograd computes them from the module as written:
    in float64 to 1e-9, with γ and β non-zero (GRN not the identity), and with the weights
    frozen (the leader step: the input's gradient only). ``forward`` takes both on a CPU,
    neither under ``FUSE4SEG_CONVNEXT=autograd`` or autocast."""
    from fuse4seg.models import segmentation as seg

    torch.manual_seed(0)
    block = seg.ConvNeXtBlock(8).double()
    with torch.no_grad():
        block.grn.gamma.normal_()
        block.grn.beta.normal_()
    x = torch.randn(5, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    flags = [(False, False), (True, False), (False, True), (True, True)]
    results = []
    for folded, by_forward in flags:
        out = block.forward_parts(x, folded_mlp=folded, depthwise_by_forward=by_forward)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *block.parameters()])))
    block.requires_grad_(False)
    frozen = [torch.autograd.grad(block.forward_parts(x, *f).square().sum(), x)[0]
              for f in flags]
    block.requires_grad_(True)
    ref_out, ref_grads = results[0]
    for (out, grads), frozen_x in zip(results[1:], frozen[1:], strict=True):
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(frozen_x, ref_grads[0], rtol=1e-9, atol=1e-9)

    # some weights frozen, some not (fine-tuning part of a block): each gradient still equals
    # autograd's, and a frozen weight gets none
    # (the gradients of β, pw2's weight and pw2's bias share ∂L/∂b2: cases freeze some of them)
    for frozen_names in (("pw1.weight",), ("dwconv.weight", "grn.gamma"), ("dwconv.bias",),
                         ("grn.beta", "pw2.weight"), ("pw2.bias", "pw1.bias"),
                         ("grn.beta", "pw2.bias")):
        grads = {}
        for f in flags:
            for name, p in block.named_parameters():
                p.requires_grad_(name not in frozen_names)
                p.grad = None
            block.forward_parts(x, *f).square().sum().backward()
            grads[f] = {n: p.grad for n, p in block.named_parameters()}
        block.requires_grad_(True)
        for f in flags[1:]:
            for name, g in grads[f].items():
                if name in frozen_names:
                    assert g is None, (f, name)
                else:
                    torch.testing.assert_close(g, grads[flags[0]][name], rtol=1e-9, atol=1e-9)

    calls = []
    real = seg._FoldedMLP.apply
    monkeypatch.setattr(seg._FoldedMLP, "apply", lambda *a: calls.append(1) or real(*a))
    y = torch.randn(2, 8, 8, 8)
    block = seg.ConvNeXtBlock(8)
    block(y)
    assert calls == [1]
    monkeypatch.setenv("FUSE4SEG_CONVNEXT", "autograd")
    block(y)
    monkeypatch.delenv("FUSE4SEG_CONVNEXT")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(y)
    assert calls == [1]
    monkeypatch.setenv("FUSE4SEG_CONVNEXT", "autgrad")
    with pytest.raises(ValueError, match="FUSE4SEG_CONVNEXT"):
        block(y)


def test_the_dense_gate_gives_the_strided_gate_s_values(monkeypatch):
    """``GatedFeedForward`` copies its gate dense on a CPU when the map is channels-last (the
    leader's layout there), and nowhere else: not on an NCHW map (its halves are dense), not
    in a compiled graph, not under ``FUSE4SEG_GATE=strided``. Both forms give the same output
    and gradients (float64, 1e-12), and a misspelt switch stops the call."""
    from fuse4seg.models import fusion

    torch.manual_seed(0)
    ffn = fusion.GatedFeedForward(6).double().to(memory_format=torch.channels_last)
    x = torch.randn(3, 6, 10, 12, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    copied = []
    real = fusion._copy_gate
    monkeypatch.setattr(fusion, "_copy_gate", lambda g: copied.append(real(g)) or copied[-1])

    def run():
        out = ffn(x)
        return out, torch.autograd.grad(out.square().sum(), [x, *ffn.parameters()])

    dense_out, dense_grads = run()
    monkeypatch.setenv("FUSE4SEG_GATE", "strided")
    strided_out, strided_grads = run()
    assert copied == [True, False]
    torch.testing.assert_close(dense_out, strided_out, rtol=1e-12, atol=1e-12)
    for d, s in zip(dense_grads, strided_grads, strict=True):
        torch.testing.assert_close(d, s, rtol=1e-12, atol=1e-12)
    monkeypatch.delenv("FUSE4SEG_GATE")
    ffn.to(memory_format=torch.contiguous_format)(x.detach().contiguous())
    # NCHW (weights and input): chunk's halves are dense already
    assert copied == [True, False, False]
    half = x.detach()[:, :3]  # a channels-last half
    assert real(half)
    # on another device never, whatever the map: the device is read first
    assert not real(torch.empty(3, 6, 10, 12, device="meta").contiguous(
        memory_format=torch.channels_last)[:, :3])
    assert not real(torch.empty(5, device="meta"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not real(half)  # a compiled graph: inductor fuses the copy away
    monkeypatch.undo()
    # the switch is read only for a CPU channels-last half (check_env_switches reads them all)
    monkeypatch.setenv("FUSE4SEG_GATE", "dense")
    with pytest.raises(ValueError, match="FUSE4SEG_GATE='dense'"):
        fusion.GatedFeedForward(6).to(memory_format=torch.channels_last)(x.detach().float())


def test_the_channel_attention_gives_the_autograd_form_s_values(monkeypatch):
    """``TransposedAttention`` runs ``_ChannelAttention`` on a CPU (eager, float, no
    autocast) and the per-head autograd form elsewhere: under ``FUSE4SEG_ATTENTION=autograd``
    and in a compiled graph. The two give the same output and gradients in float64 (every
    parameter, the temperature included), with a query channel that is all zero (its norm
    clamped, as ``F.normalize`` does) and on an NCHW map as well; a misspelt switch stops
    the call."""
    from fuse4seg.models import fusion

    torch.manual_seed(0)
    attn = fusion.TransposedAttention(12, 3).double().to(memory_format=torch.channels_last)
    with torch.no_grad():
        attn.temperature.uniform_(0.5, 2.0)
        attn.qkv.weight[1].zero_()  # query channel 1 is zero: its norm is clamped
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
    used = []
    real = fusion._cpu_attention
    monkeypatch.setattr(fusion, "_cpu_attention", lambda t: used.append(real(t)) or used[-1])

    def run(module, inp):
        out = module(inp)
        grads = torch.autograd.grad((out * weights).sum(), [inp, *module.parameters()])
        return [out.detach(), *grads]

    def same(a_list, b_list):
        for a, b in zip(a_list, b_list, strict=True):
            scale = float(b.abs().max())  # the zero channel's weight gradient is ~1e11
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(scale, 1.0))

    shipped = run(attn, x)
    monkeypatch.setenv("FUSE4SEG_ATTENTION", "autograd")
    before = run(attn, x)
    assert used == [True, False]
    same(shipped, before)
    assert float(shipped[3].abs().max()) > 1e6  # the clamp was met (∂/∂ qkv.weight)
    monkeypatch.delenv("FUSE4SEG_ATTENTION")
    # NCHW weights and input: t is then the column-major view of an NCHW map
    attn_nchw = copy.deepcopy(attn).to(memory_format=torch.contiguous_format)
    x_nchw = x.detach().contiguous().requires_grad_(True)
    nchw = run(attn_nchw, x_nchw)
    assert used[-1] is True
    same(nchw, before)
    qkv = torch.zeros(1, 6, 2, 2)
    assert real(qkv) and not real(qkv.half())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not real(qkv)  # a compiled graph differentiates the autograd form
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not real(qkv)
    monkeypatch.setenv("FUSE4SEG_ATTENTION", "heads")
    with pytest.raises(ValueError, match="FUSE4SEG_ATTENTION='heads'"):
        attn(x.detach())


def test_the_channel_attention_passes_gradcheck():
    """``_ChannelAttention``'s hand-written backward against finite differences (float64), on
    a dense ``t`` and on the strided views the leader hands it (a channels-last map's, and an
    NCHW map's column-major one), with 2 heads of 2 channels."""
    from fuse4seg.models.fusion import _ChannelAttention

    torch.manual_seed(0)
    head = torch.arange(4) // 2
    off_head = head[:, None] != head[None, :]
    temperature = torch.tensor([[0.7], [0.7], [1.3], [1.3]], dtype=torch.float64,
                               requires_grad=True)
    dense = torch.randn(2, 5, 12, dtype=torch.float64)
    column_major = torch.randn(2, 12, 5, dtype=torch.float64).transpose(1, 2)
    wide = torch.randn(2, 5, 20, dtype=torch.float64)[:, :, 3:15]  # a strided column slice
    for t in (dense, column_major, wide):
        t = t.detach().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda t_, temp: _ChannelAttention.apply(t_, temp, off_head), (t, temperature))


def test_the_folded_mlp_norm_gives_vector_norm_s_values(monkeypatch):
    """GRN's ‖a‖ as the root of a sum of squares (``_pixel_norm``, shipped) and as
    ``torch.linalg.vector_norm`` (``FUSE4SEG_GRN_NORM=vector_norm``, the folded MLP's code
    before 2026-12-06, which the switch does reach) give a ConvNeXt block the same output and
    gradients (float64, 1e-10), with one all-zero channel; the helper works in float32 at
    least."""
    from fuse4seg.models import segmentation as seg

    monkeypatch.delenv("FUSE4SEG_CONVNEXT", raising=False)  # the folded MLP, not GRN's own
    norms = []
    real_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm",
                        lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    torch.manual_seed(1)
    block = seg.ConvNeXtBlock(8).double()
    with torch.no_grad():
        block.grn.gamma.normal_()
        block.grn.beta.normal_()
        block.pw1.weight[3] = 0  # pre-activation 0 → GELU 0: one all-zero channel of a
        block.pw1.bias[3] = 0
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64, requires_grad=True)

    def run():
        out = block(x)
        return out, torch.autograd.grad(out.square().sum(), [x, *block.parameters()])

    out, grads = run()
    assert norms == []
    monkeypatch.setenv("FUSE4SEG_GRN_NORM", "vector_norm")
    ref_out, ref_grads = run()
    assert norms == [1]
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    a = torch.randn(2, 50, 7, dtype=torch.bfloat16)
    g = seg._pixel_norm(a)
    assert g.dtype == torch.float32 and g.shape == (2, 1, 7)
    torch.testing.assert_close(g, real_norm(a.float(), dim=1, keepdim=True))


def test_depthwise_weight_grad_equals_autograd_in_both_layouts():
    """``depthwise_weight_grad`` (one folded forward convolution) gives the weight gradient
    autograd computes for a depthwise convolution with padding k // 2: float64, k 7 and 3,
    non-square maps, one smaller than the kernel, NCHW and channels-last inputs."""
    from fuse4seg.models.segmentation import depthwise_weight_grad

    gen = torch.Generator().manual_seed(3)
    for k, shape in ((7, (3, 5, 9, 6)), (7, (2, 4, 5, 4)), (3, (4, 6, 8, 11))):
        c = shape[1]
        w = torch.randn(c, 1, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, dtype=torch.float64, generator=gen)
            x = x.contiguous(memory_format=fmt)
            y = F.conv2d(x, w, padding=k // 2, groups=c)
            gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
            gy = gy.contiguous(memory_format=fmt)
            (ref,) = torch.autograd.grad(y, w, gy)
            got = depthwise_weight_grad(x, gy, k)
            assert got.shape == (c, 1, k, k)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_probe_follower_prints_its_tables(capsys):
    """``probe_follower.py`` at a tiny size: one row per distinct convolution of the follower
    and per 7×7 depthwise shape, with positive times, and one row per variant, each within
    rounding of ``autograd``."""
    from bench_scripts import load

    from fuse4seg.models import segmentation as seg_mod
    from fuse4seg.models.segmentation import ConvNeXtBlock

    probe = load("probe_follower")
    shipped = ConvNeXtBlock.forward
    assert probe.main(["--size", "16", "--batch", "2", "--inner-steps", "1", "--rounds", "1",
                       "--repeats", "1", "--threads", "1"]) == 0
    assert ConvNeXtBlock.forward is shipped  # restored
    lines = capsys.readouterr().out.splitlines()
    convs = [r.split(" | ") for r in lines if r.startswith("| ") and r[2].isdigit()]
    follower = create_segmentation("convnext_unet_small")
    assert sum(int(r[3]) for r in convs) == sum(
        isinstance(m, torch.nn.Conv2d) for m in follower.modules())
    assert all(float(c) > 0 for r in convs for c in r[4:7])
    depthwise = [r.rstrip(" |").split(" | ") for r in lines
                 if r.startswith("| input ") and r[8].isdigit()]
    assert len(depthwise) == 4  # one per level: the encoder's and decoder's blocks share it
    assert all(float(c) > 0 for r in depthwise for c in r[1:5])
    # the code it times the package's against computes the same gradient (3 images of 24
    # channels: chunks of 2 images and 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 24, 9, 9, dtype=torch.float64, generator=gen)
    gy = torch.randn(3, 24, 9, 9, dtype=torch.float64, generator=gen)
    x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    torch.testing.assert_close(probe.chunked_weight_grad(x, gy, 7),
                               seg_mod.depthwise_weight_grad(x, gy, 7), rtol=1e-10, atol=1e-10)
    rows = {r.split(" | ")[0][2:]: r.rstrip(" |").split(" | ") for r in lines
            if r.startswith("| ") and r.split(" | ")[0][2:] in probe.VARIANTS}
    assert list(rows) == list(probe.VARIANTS)
    gaps = {v: float(r[-1]) for v, r in rows.items()}
    assert gaps["autograd"] == 0 and max(gaps.values()) < 1e-4


def test_probe_cpu_levers_prints_its_tables(capsys):
    """``probe_cpu_levers.py`` at a tiny size: one row per gated feed-forward, ConvNeXt block
    and LayerNorm shape of the two networks and per attention shape of the leader (counts
    adding up to the modules of each kind), positive times, an x_f that the dense gate and the
    hand-written attention change only by rounding, a row for each whole step with the three
    levers, and every switch restored."""
    from bench_scripts import load

    from fuse4seg.models import fusion as fusion_mod
    from fuse4seg.models.layers import LayerNorm2d
    from fuse4seg.models.segmentation import ConvNeXtBlock

    probe = load("probe_cpu_levers")
    switches = {k for lever in probe.BEFORE.values() for k in lever}
    assert switches == {"FUSE4SEG_GATE", "FUSE4SEG_GRN_NORM", "FUSE4SEG_ATTENTION"}
    assert not switches & set(os.environ)
    assert probe.main(["--size", "16", "--batch", "2", "--inner-steps", "1", "--rounds", "1",
                       "--repeats", "1", "--threads", "1"]) == 0
    assert not switches & set(os.environ)
    out = capsys.readouterr().out
    sections = out.split("\n## ")
    assert len(sections) == 6, out

    def rows(text: str) -> list[list[str]]:
        return [r.strip(" |").split(" | ") for r in text.splitlines()
                if r.startswith("| ") and r[2].isdigit()]

    engine = probe.build_engine("default", 16, 2, 1)  # the networks it measured
    leader, follower = engine.leader.net, engine.follower.net

    def count(net, kind):
        return sum(isinstance(m, kind) for m in net.modules())

    gate, outer = rows(sections[1]), [r for r in rows(sections[1]) if "B 2" in r[0]]
    gate = [r for r in gate if r not in outer]
    assert sum(int(r[1]) for r in gate) == count(leader, fusion_mod.GatedFeedForward)
    assert len(outer) == 1 and float(outer[0][-1]) < 1e-5  # x_f: rounding only
    norms = rows(sections[2])
    blocks = count(follower, ConvNeXtBlock)
    assert sum(int(r[1]) for r in norms) == blocks * 2  # the norm table, then the block table
    norm_rows = rows(sections[3])
    assert sum(int(r[1]) for r in norm_rows) == (count(follower, torch.nn.LayerNorm)
                                                 + count(leader, LayerNorm2d))
    assert all(float(c) > 0 for r in gate + norms + norm_rows for c in r[2:4])
    attention = rows(sections[4])
    attention_outer = [r for r in attention if "B 2" in r[0]]
    attention = [r for r in attention if r not in attention_outer]
    assert sum(int(r[1]) for r in attention) == count(leader, fusion_mod.TransposedAttention)
    assert all(float(c) > 0 for r in attention for c in r[2:4])
    assert len(attention_outer) == 1 and float(attention_outer[0][-1]) < 1e-5  # rounding only
    steps = [r for r in sections[5].splitlines() if r.startswith(("| warm-up", "| outer"))]
    assert [r.split(",")[0] for r in steps] == ["| warm-up", "| outer"]
    assert all(float(c) > 0 for r in steps for c in r.strip(" |").split(" | ")[1:])


def test_probe_threads_prints_its_tables(capsys):
    """``probe_threads.py`` at a tiny size: the two forwards' row (positive times, an x_f that
    one thread changes only by rounding), one row per single operation with its call count,
    and the caller's thread count restored."""
    from bench_scripts import load

    probe = load("probe_threads")
    threads = torch.get_num_threads()
    assert probe.main(["--size", "16", "--batch", "2", "--rounds", "1", "--repeats", "1",
                       "--threads", "2", "--op-calls", "2", "--fusion", "fuse4seg_tiny"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    sections = out.split("\n## ")
    assert len(sections) == 3, out

    def rows(text: str) -> list[list[str]]:
        return [r.strip(" |").split(" | ") for r in text.splitlines()
                if r.startswith("| ") and not r.startswith("| one after") and "---" not in r
                and not r.startswith("| operation")]

    (forwards,) = rows(sections[1])
    assert all(float(c) > 0 for c in forwards[:4])
    assert float(forwards[4]) < 1e-5
    ops = rows(sections[2])
    assert [r[0] for r in ops] == list(probe.op_calls(16, 2))
    assert [int(r[1]) for r in ops] == [2, 2, 2, 100]
    # at 16×16 two calls may take under 0.05 ms, which prints as 0.0: the times are only
    # checked to be numbers >= 0; the ratio comes from the unrounded times, so it is > 0
    assert all(float(c) >= 0 for r in ops for c in r[2:4])
    assert all(float(r[4]) > 0 for r in ops)


def test_probe_compile_follower_opaque_block_has_the_blocks_gradients():
    """``probe_compile_follower.py``'s opaque depthwise module, run eagerly, gives a ConvNeXt
    block the outputs and gradients of its plain ops (float64), and traces into one graph with
    no break: the maths its ``compile_opaque`` arm hands to the compiler (inductor itself is
    not run here)."""
    import copy

    from bench_scripts import load

    from fuse4seg.models import segmentation as seg

    probe = load("probe_compile_follower")
    torch.manual_seed(0)
    plain = seg.ConvNeXtBlock(8).double()
    with torch.no_grad():  # GRN starts as the identity: make its γ, β matter
        plain.grn.gamma.normal_()
        plain.grn.beta.normal_()
    opaque = probe.use_opaque_depthwise(copy.deepcopy(plain))
    assert isinstance(opaque.dwconv, probe.OpaqueDepthwise)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    gy = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    grads = []
    for block in (plain, opaque):
        xi = x.clone().requires_grad_(True)
        y = block.forward_parts(xi, folded_mlp=False, depthwise_by_forward=False)
        y.backward(gy)
        grads.append([y.detach(), xi.grad, *(p.grad for p in block.parameters())])
    assert len(grads[0]) == len(grads[1]) == 12  # y, ∂x, and 2 each: dwconv, norm, pw1, GRN, pw2
    for want, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    explained = torch._dynamo.explain(opaque)(x.detach())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_probe_compile_follower_prints_its_table(capsys):
    """``probe_compile_follower.py``'s eager arms at a tiny size, each in its own process: one
    row per arm with a positive median; an unknown arm is refused by name."""
    from bench_scripts import load

    probe = load("probe_compile_follower")
    assert probe.main(["--arms", "eager,eager_plain", "--size", "16", "--batch", "2",
                       "--rounds", "1", "--repeats", "2", "--warmup", "1",
                       "--threads", "1"]) == 0
    rows = [r.strip(" |").split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| eager")]
    assert [r[0] for r in rows] == ["eager", "eager_plain"]
    assert all(float(r[1]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        probe.main(["--arms", "eager,jit"])
    assert "unknown ['jit']" in capsys.readouterr().err


def test_probe_onednn_calls_prints_its_tables(capsys):
    """``probe_onednn_calls.py`` at a tiny size: oneDNN's own executions read from its verbose
    lines (convolutions among them, with positive times), the ATen convolutions' self time,
    and a 1×1 convolution as ``F.linear`` with the convolution's values; a malformed shape is
    refused by name, and the caller's thread count is restored."""
    from bench_scripts import load

    probe = load("probe_onednn_calls")
    threads = torch.get_num_threads()
    # the probe runs on 2 threads (with 1, ATen sends small 1×1 convolutions to its own
    # kernel, not oneDNN), and must give the caller's 1 back
    torch.set_num_threads(1)
    try:
        assert probe.main(["--sizes", "16", "--batch", "2", "--inner-steps", "1", "--steps",
                           "1", "--repeats", "1", "--warmup", "1", "--threads", "2",
                           "--fusion", "fuse4seg_tiny", "--pointwise", "2,8,16,5",
                           "--calls", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    (row,) = [r.strip(" |").split(" | ") for r in lines if r.startswith("| 16×16")]
    assert float(row[1]) > 0 and int(row[2]) > 0 and float(row[3]) > 0
    kinds = {k.split()[0]: float(k.split(": ")[1]) for k in row[4].split(", ")}  # kind n: ms
    assert "convolution" in kinds and kinds["convolution"] > 0 and float(row[5]) > 0
    created = dict(c.rsplit(" ", 1) for c in row[7].split(", "))
    assert set(created) <= {"cache_hit", "cache_miss"} and int(created["cache_hit"]) > 0
    assert 0 < int(row[8]) < int(row[4].split("convolution ")[1].split(":")[0])  # 1×1 of all
    (pw,) = [r.strip(" |").split(" | ") for r in lines if r.startswith("| 2×8×5×5 → 16")]
    assert float(pw[1]) > 0 and float(pw[2]) > 0 and float(pw[4]) < 1e-4
    # part 4: the step with 1×1 convolutions as F.linear, and nn.Conv2d put back
    shipped = torch.nn.Conv2d._conv_forward
    assert probe.main(["--sizes", "16", "--batch", "2", "--inner-steps", "1", "--steps", "1",
                       "--repeats", "1", "--warmup", "1", "--threads", "1",
                       "--fusion", "fuse4seg_tiny", "--pointwise", "--step-rounds", "1"]) == 0
    assert torch.nn.Conv2d._conv_forward is shipped
    out = capsys.readouterr().out
    linear = int(out.split("F.linear (")[1].split(" calls")[0])
    assert linear > 0
    (step,) = [r.strip(" |").split(" | ") for r in out.splitlines()
               if r.startswith("| ") and r[2].isdigit()][-1:]
    assert all(float(v) > 0 for v in step)
    with pytest.raises(SystemExit):
        probe.main(["--pointwise", "4,16,48"])
    assert "--pointwise: each item is B,C,O,H" in capsys.readouterr().err
