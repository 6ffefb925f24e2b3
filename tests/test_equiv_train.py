"""``benchmarks/equiv_train.py``: whole runs with and without a speed change (GRN's backward, the
fused AdamW, the leader's channels-last layout, the ConvNeXt blocks' CPU rewrites)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from bench_scripts import load


def test_the_formula_variant_differentiates_the_formula_and_is_undone():
    """``formula`` swaps GRN's hand-written function for autograd's graph of the formula (the
    same values and gradients to float rounding) and restores the shipped one on exit."""
    from fuse4seg.models.segmentation import GRN

    equiv = load("equiv_train")
    torch.manual_seed(0)
    layer = GRN(8)
    with torch.no_grad():
        layer.gamma.normal_()
        layer.beta.normal_()
    x = torch.randn(2, 5, 5, 8, requires_grad=True)

    def run():
        y = layer(x)
        grads = torch.autograd.grad((y * y.detach().sin()).sum(), (x, layer.gamma, layer.beta))
        return y, type(y.grad_fn).__name__, grads

    y0, fn0, g0 = run()
    with equiv.grn("formula"):
        y1, fn1, g1 = run()
    y2, fn2, _ = run()
    assert "GRNFunction" in fn0 and "GRNFunction" not in fn1 and fn2 == fn0
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_loop_variant_asks_for_torchs_default_adamw_and_is_undone(monkeypatch):
    from fuse4seg.train.engine import adamw

    equiv = load("equiv_train")
    monkeypatch.delenv("FUSE4SEG_ADAMW", raising=False)
    net = torch.nn.Linear(2, 2)
    with equiv.adamw("loop"):
        assert not adamw(net, 1e-3, 0.0).param_groups[0]["fused"]
    assert adamw(net, 1e-3, 0.0).param_groups[0]["fused"] is True
    with equiv.adamw("shipped"):
        assert adamw(net, 1e-3, 0.0).param_groups[0]["fused"] is True
    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")  # a caller's setting survives both variants
    for variant in ("shipped", "loop"):
        with equiv.adamw(variant):
            pass
        assert os.environ["FUSE4SEG_ADAMW"] == "loop"


def test_the_nchw_variant_keeps_the_leader_in_nchw_and_is_undone(monkeypatch):
    from fuse4seg.models import create_fusion, place_leader

    equiv = load("equiv_train")
    monkeypatch.delenv("FUSE4SEG_LEADER_LAYOUT", raising=False)

    def channels_last() -> bool:
        weight = place_leader(create_fusion("fuse4seg_tiny"), "cpu").head[0].weight
        return weight.is_contiguous(memory_format=torch.channels_last)

    with equiv.layout("nchw"):
        assert not channels_last()
    assert channels_last() and "FUSE4SEG_LEADER_LAYOUT" not in os.environ
    with equiv.layout("shipped"):
        assert channels_last()
    assert set(equiv.CHANGES) == {"grn", "adamw", "layout", "convnext", "gate", "norm",
                                  "attention"}


def test_the_autograd_variant_runs_the_blocks_as_written_and_is_undone(monkeypatch):
    """``--change convnext``: ``autograd`` sets ``FUSE4SEG_CONVNEXT=autograd`` (the blocks
    build autograd's graph from their modules: GRN's function, no ``_FoldedMLP``) and removes
    it on exit; ``grn``'s two variants both run the blocks as written, or GRN would not be
    called on a CPU."""
    from fuse4seg.models.segmentation import ConvNeXtBlock

    equiv = load("equiv_train")
    monkeypatch.delenv("FUSE4SEG_CONVNEXT", raising=False)
    block = ConvNeXtBlock(8)
    x = torch.randn(1, 8, 4, 4)

    def graph() -> str:
        seen, stack = {}, [block(x).grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and id(fn) not in seen:
                seen[id(fn)] = fn  # kept alive, so no later node reuses its id
                stack.extend(f for f, _ in fn.next_functions)
        return " ".join(sorted({type(fn).__name__ for fn in seen.values()}))

    assert "FoldedMLP" in graph()
    with equiv.convnext("autograd"):
        assert "FoldedMLP" not in graph() and "GRNFunction" in graph()
    assert "FoldedMLP" in graph() and "FUSE4SEG_CONVNEXT" not in os.environ
    for variant in ("shipped", "formula"):
        with equiv.grn(variant):
            assert "FoldedMLP" not in graph()
    with equiv.convnext("shipped"):
        assert "FoldedMLP" in graph()


def test_the_strided_vector_norm_and_attention_variants_restore_the_code_before(monkeypatch):
    """``--change gate``: ``strided`` stops the leader's gate copy; ``--change norm``:
    ``vector_norm`` makes the folded MLP call ``torch.linalg.vector_norm``; ``--change
    attention``: ``autograd`` runs the leader's attention per head; each switch is removed on
    exit, and ``shipped`` runs the package as it is."""
    from fuse4seg.models import fusion
    from fuse4seg.models.segmentation import ConvNeXtBlock

    equiv = load("equiv_train")
    for name in ("FUSE4SEG_GATE", "FUSE4SEG_GRN_NORM", "FUSE4SEG_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    half = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)[:, :4]
    with equiv.gate("strided"):
        assert not fusion._copy_gate(half)
    assert fusion._copy_gate(half) and "FUSE4SEG_GATE" not in os.environ
    with equiv.gate("shipped"):
        assert fusion._copy_gate(half)

    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    block = ConvNeXtBlock(8)
    x = torch.randn(1, 8, 4, 4)
    with equiv.norm("vector_norm"):
        block(x)
    assert calls == [1] and "FUSE4SEG_GRN_NORM" not in os.environ
    with equiv.norm("shipped"):
        block(x)
    block(x)
    assert calls == [1]

    qkv = torch.zeros(1, 6, 2, 2)
    with equiv.attention("autograd"):
        assert not fusion._cpu_attention(qkv)
    assert fusion._cpu_attention(qkv) and "FUSE4SEG_ATTENTION" not in os.environ
    with equiv.attention("shipped"):
        assert fusion._cpu_attention(qkv)


def test_bad_arguments_are_named(tmp_path, capsys):
    equiv = load("equiv_train")
    with pytest.raises(SystemExit):
        equiv.main(["--data", str(tmp_path / "nowhere")])
    assert f"--data {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        equiv.main(["--data", str(tmp_path), "--seeds", "0"])
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_equiv_train_runs_with_the_smoke_profile(phantom_dir, tmp_path, capsys):
    """End to end on the smoke profile, 2 seeds: both variants train, and over runs this short
    the two runs of a seed differ by float rounding only, far below the gap between seeds."""
    equiv = load("equiv_train")
    code = equiv.main(["--data", str(phantom_dir), "--profile", "smoke", "--seeds", "0", "1",
                       "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = re.findall(r"^\| (\d) \| (\S+) / (\S+) \| (\S+) / (\S+) \| ", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"], out
    for _, rms_loss, max_loss, rms_val, max_val in rows:
        assert 0 <= float(rms_loss) <= float(max_loss) < 1e-3, out
        assert 0 <= float(rms_val) <= float(max_val) < 1e-2, out
    assert len(list((tmp_path / "grn" / "formula").glob("fuse4seg-smoke-*"))) == 2
    assert "noise: RMS difference between the shipped runs of two seeds, per pair (0-1)" in out
    assert "every gap within a seed below every difference between seeds: L_lower " in out
