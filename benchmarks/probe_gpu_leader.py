"""Where the paper leader's GPU step goes, and what each candidate change buys (issue 9, part 5).

    python benchmarks/probe_gpu_leader.py [--device cuda] [--size 240] [--batch 4]
        [--variants amp,fp32,...] [--repeats 10] [--trace 30]

The bi-level outer step at the paper's size spends most of its time in the leader (its
``no_grad`` forward on D_tr and its forward and backward on D_val, ``benchmarks/RESULTS.md``).
This times the leader's forward and backward alone, on a ``(--batch, 1, S, S)`` pair (4: the
leader step's half of a batch of 8), loss = mean(x_f) + Σ mean(feature²), under each variant:

- ``fp32``: eager float32; ``amp``: bf16 autocast (the trainer's CUDA default), the baseline;
- ``amp_ln_nchw``, ``fp32_ln_nchw``: ``LayerNorm2d``'s output copied back to NCHW for an
  NCHW input (the package leaves it channels-last), so that the convolutions after the norm
  run NCHW and the depthwise kernel gets NCHW maps without a copy;
- ``amp_dw_cudnn``: the depthwise convolutions through cuDNN (``DepthwiseConv2d`` turns cuDNN
  off for them under reduced precision);
- ``amp_ln_cf``: ``LayerNorm2d`` computed over dim 1 in place (no permutes, so no layout
  change between the norm and the next convolution);
- ``amp_attn``: the channel attention from unnormalised q and k, divided by the outer product
  of their norms (no normalised copies of q and k stored for the backward);
- ``amp_cl``: leader weights and inputs channels-last; ``amp_cl_dw_cudnn``: and cuDNN depthwise;
- ``amp_graph``: the baseline's forward and backward captured as CUDA graphs
  (``torch.cuda.make_graphed_callables``), to see what launch overhead costs;
- ``amp_best``: ``amp_ln_cf`` + ``amp_attn`` + ``amp_dw_cudnn`` together.

Each row: median ms of ``--repeats`` timed calls (after 3 untimed), × ``amp``, peak memory and
the largest difference of x_f from the baseline's (same weights, same input). Then, with
``--trace N``, torch.profiler's N ops with the most self CUDA time in 3 calls of ``amp`` and of
``fp32``, grouped by input shape, beside the wall time of those calls. A measurement only: it
patches classes for the duration of one variant and restores them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import _sync, profiled  # noqa: E402

from fuse4seg.models import create_fusion  # noqa: E402
from fuse4seg.models import fusion as fusion_mod  # noqa: E402
from fuse4seg.models.layers import LayerNorm2d  # noqa: E402

VARIANTS = ("amp", "fp32", "amp_ln_nchw", "fp32_ln_nchw", "amp_dw_cudnn", "amp_ln_cf",
            "amp_attn", "amp_cl", "amp_cl_dw_cudnn", "amp_graph", "amp_best")


def _ln_channels_first(self, x):
    xf = x.float()
    mu = xf.mean(dim=1, keepdim=True)
    var = (xf - mu).pow(2).mean(dim=1, keepdim=True)
    y = (xf - mu) * torch.rsqrt(var + self.eps)
    return y * self.weight[:, None, None] + self.bias[:, None, None]


def _ln_nchw_out(self, x):
    nchw = not x.is_contiguous(memory_format=torch.channels_last)
    y = x.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), self.weight, self.bias, self.eps)
    y = y.permute(0, 3, 1, 2)
    return y.contiguous() if nchw else y


def _attn_unnormalised(self, x):
    b, c, h, w = x.shape
    q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
    qn = q.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, h, d, 1)
    kn = k.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attn = (q @ k.transpose(-2, -1)).float() / (qn * kn.transpose(-2, -1)) * self.temperature
    out = attn.softmax(dim=-1).to(v.dtype) @ v
    return self.proj(out.reshape(b, c, h, w))


def _dw_cudnn(self, x):
    return nn.Conv2d.forward(self, x)


PATCHES = {
    "amp_ln_nchw": [(LayerNorm2d, "forward", _ln_nchw_out)],
    "fp32_ln_nchw": [(LayerNorm2d, "forward", _ln_nchw_out)],
    "amp_dw_cudnn": [(fusion_mod.DepthwiseConv2d, "forward", _dw_cudnn)],
    "amp_cl_dw_cudnn": [(fusion_mod.DepthwiseConv2d, "forward", _dw_cudnn)],
    "amp_ln_cf": [(LayerNorm2d, "forward", _ln_channels_first)],
    "amp_attn": [(fusion_mod.TransposedAttention, "forward", _attn_unnormalised)],
    "amp_best": [(LayerNorm2d, "forward", _ln_channels_first),
                 (fusion_mod.TransposedAttention, "forward", _attn_unnormalised),
                 (fusion_mod.DepthwiseConv2d, "forward", _dw_cudnn)],
}


@contextlib.contextmanager
def patched(variant: str):
    saved = []
    for cls, name, fn in PATCHES.get(variant, []):
        saved.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, fn)
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


class Flat(nn.Module):
    """The leader with a flat tuple output (what ``make_graphed_callables`` accepts)."""

    def __init__(self, leader):
        super().__init__()
        self.leader = leader

    def forward(self, x1, x2):
        x_f, feats = self.leader(x1, x2)
        return (x_f, *feats)


def make_step(variant, leader, x1, x2, device):
    amp = not variant.startswith("fp32") and device.type == "cuda"
    ctx = (lambda: torch.autocast("cuda", torch.bfloat16, cache_enabled=False)) if amp \
        else contextlib.nullcontext
    net = Flat(leader)
    if variant == "amp_graph":
        with ctx():
            net = torch.cuda.make_graphed_callables(net, (x1, x2), num_warmup_iters=3)

    def step():
        leader.zero_grad(set_to_none=False)
        with ctx():
            out = net(x1, x2)
        loss = out[0].float().mean() + sum(f.float().pow(2).mean() for f in out[1:])
        loss.backward()
        return out[0]

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--fusion", default="fuse4seg_paper")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--trace", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    torch.manual_seed(0)
    base = create_fusion(args.fusion).to(device)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(args.batch, 1, args.size, args.size, generator=gen).to(device)
    x2 = torch.rand(args.batch, 1, args.size, args.size, generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {args.fusion} forward+backward, batch {args.batch}, {args.size}², {name}, "
          f"torch {torch.__version__}")
    print("\n| variant | ms | × amp | peak GiB | max |x_f − amp's| |")
    print("|---|---:|---:|---:|---:|")
    ref = None
    t_amp = None
    for variant in variants:
        leader = copy.deepcopy(base)
        a, b = x1, x2
        if variant.startswith("amp_cl"):
            leader = leader.to(memory_format=torch.channels_last)
            a = x1.contiguous(memory_format=torch.channels_last)
            b = x2.contiguous(memory_format=torch.channels_last)
        try:
            with patched(variant):
                step = make_step(variant, leader, a, b, device)
                for _ in range(3):
                    out = step()
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = step()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 \
                    if device.type == "cuda" else float("nan")
        except Exception as exc:  # a variant that cannot run is reported
            print(f"| {variant} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |")
            continue
        ms = 1000 * statistics.median(times)
        x_f = out.detach().float().clone()
        if variant == "amp":
            ref, t_amp = x_f, ms
        diff = f"{(x_f - ref).abs().max().item():.2e}" if ref is not None else ""
        ratio = f"{t_amp / ms:.2f}×" if t_amp else ""
        print(f"| {variant} | {ms:.1f} | {ratio} | {peak:.1f} | {diff} |", flush=True)
        del leader, step, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.trace:
        for variant in ("amp", "fp32"):
            if variant not in variants:
                continue
            step = make_step(variant, copy.deepcopy(base), x1, x2, device)
            for _ in range(3):
                step()
            prof, wall, key = profiled(step, device, record_shapes=True)
            print(f"\n# {variant}: 3 calls, {1000 * wall:.0f} ms of wall time under the "
                  "profiler; ops by self time")
            print(prof.key_averages().table(sort_by=key, row_limit=args.trace))
            print(f"\n# {variant}: by input shape")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by=key, row_limit=args.trace, max_name_column_width=40,
                max_shapes_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
