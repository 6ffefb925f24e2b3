"""The segmentation follower Ψ of §3.4: a ConvNeXt U-shape with a self-attention bottleneck.

Explained in chapter 3 (``book/03_segmentation_follower.md``). Building blocks (ConvNeXt V2
block, down/up-sampling, transformer bottleneck) → :class:`ConvNeXtUNet`; the registered
variants live in ``fuse4seg.models.registry``.

Layout, for ``dims = (C0, C1, C2, C3, C4)`` (five levels, stride 16)::

    x (B, in, H, W) ── stem 3×3 conv + LN ──> C0 @ H        ── ConvNeXt ×d0 ──> skip0
      down (LN + 2×2 conv, stride 2)     ──> C1 @ H/2      ── ConvNeXt ×d1 ──> skip1
      down                               ──> C2 @ H/4      ── ConvNeXt ×d2 ──> skip2
      down                               ──> C3 @ H/8      ── ConvNeXt ×d3 ──> skip3
      down                               ──> C4 @ H/16     ── MSA bottleneck ×nb
      up (2×2 transposed conv) ⊕ skip3 → 1×1 conv → ConvNeXt ×u3 → ... → C0 @ H → 1×1 head → 4

Choices where the paper is silent (also stated in chapter 3):

- **ConvNeXt version.** The paper cites ConvNeXt V2 [33], so each block is a V2 block:
  7×7 depthwise conv → LayerNorm → 1×1 expand ×4 → GELU → global response normalisation (GRN)
  → 1×1 project, residual (V2 drops V1's layer scale).
- **Full-resolution stem.** A 3×3 convolution instead of ConvNeXt's 4×4 patchify, so the
  highest skip connection carries full-resolution detail for the boundaries.
- **Bottleneck.** Pre-norm transformer blocks (multi-head self-attention over the H/16 × W/16
  tokens, then an MLP ×4) with a 3×3 depthwise convolutional position encoding (works for any
  input size, unlike a learnt position table). At 240 × 240 input that is 15 × 15 = 225 tokens.
- **Widths.** The paper gives none; the ``paper`` variant has 2.07 M weights, 3.8× the
  ``fuse4seg_paper`` leader's 0.55 M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuse4seg.models.layers import LayerNorm2d, check_divisible, cpu_float_eager
from fuse4seg.utils import env_setting

__all__ = ["ConvNeXtBlock", "ConvNeXtUNet", "GRN", "TransformerBottleneckBlock",
           "depthwise_weight_grad", "grn_formula"]


def grn_formula(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> torch.Tensor:
    """GRN as ConvNeXt V2 writes it, for autograd (and for ``torch.compile``, which fuses its
    elementwise chain itself): ``γ (x N) + β + x``, ``N = G / (mean_c G + eps)``, ``G = ‖x‖₂``
    over H, W of ``x (B, H, W, C)``, in float32 at least."""
    g = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
    n = (g / (g.mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return gamma * (x * n) + beta + x


def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """GRN's ``G``: ``‖x‖₂`` over the pixels of ``x (B, P, C)``, ``(B, 1, C)``, in float32 at
    least (autocast), as the root of a sum of squares.

    ``torch.linalg.vector_norm(x, dim=1)`` gives the same values to float rounding, but its CPU
    kernel reduces over a middle dimension slowly: at the follower's shapes it took 2.1-15× as
    long and a whole ConvNeXt block's forward and backward 1.03-1.22× as long in five runs of
    ``benchmarks/probe_cpu_levers.py`` on an Intel Xeon, and the ``default`` profile's
    warm-up step 1.03× as long in the two that timed it (``benchmarks/RESULTS.md``, "Three
    more levers"). No scaling against overflow: GRN's inputs are activations, far below
    float32's √max ≈ 1.8e19. ``_GRNFunction`` and ``_FoldedMLP`` share it (the latter called
    ``vector_norm`` until 2026-12-06; ``FUSE4SEG_GRN_NORM=vector_norm`` restores that)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.to(acc).square().sum(dim=1, keepdim=True).sqrt()


def _grn_norm_grad(d_s: torch.Tensor, gamma: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                   channels: int) -> torch.Tensor:
    """GRN's ``s = 1 + γ N`` with ``N = G / m``, ``m = mean_c G + eps``, ``G = ‖x‖₂`` over
    H, W: the factor ``t`` with ``∂L/∂x = t · x`` along the path through ``G``, from
    ``∂L/∂s`` ``(B, 1, C)``. ``dG/dx = x / G``, 0 where a channel is all zero (as
    ``vector_norm``'s backward). Shared by ``_GRNFunction`` and ``_FoldedMLP``."""
    d_n = d_s * gamma  # (B, 1, C)
    d_g = d_n / m - (d_n * g).sum(dim=-1, keepdim=True) / (m * m * channels)
    return torch.where(g > 0, d_g / g.clamp_min(1e-30), torch.zeros_like(g))


class _GRNFunction(torch.autograd.Function):
    """``y = x · (1 + γ N) + β`` with ``N = G / (mean_c G + eps)``, ``G = ‖x‖₂`` over H, W.

    The same maths as ConvNeXt V2's ``γ (x N) + β + x``, written as one ``addcmul`` over the
    full-size map (the per-channel factor ``1 + γ N`` is small) and with a hand-written
    backward that makes two passes over the map instead of autograd's chain of elementwise
    ops. On a CPU this made the ``default`` profile's warm-up step (one follower update) 1.19×
    faster (``benchmarks/RESULTS.md``); a CPU block now folds GRN into pw2 instead
    (``_FoldedMLP``), so this serves GPUs. ``G`` is computed in float32 under autocast.
    Eager only: inductor cannot compile it (symbolic shapes in the reshapes), and needs not, so
    a compiled GRN runs :func:`grn_formula`.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float):
        b, h, w, c = x.shape
        xf = x.reshape(b, h * w, c)  # (B, P, C), P = H·W
        g = _pixel_norm(xf)  # (B, 1, C), float32 at least (autocast)
        m = g.mean(dim=-1, keepdim=True) + eps  # (B, 1, 1)
        n = g / m  # (B, 1, C)
        s = (1 + gamma * n).to(torch.result_type(x, gamma))  # (B, 1, C)
        y = torch.addcmul(beta, xf, s)  # (B, P, C)
        ctx.save_for_backward(x, gamma, g, m, n, s)
        return y.reshape(b, h, w, c)

    @staticmethod
    def backward(ctx, dy):
        x, gamma, g, m, n, s = ctx.saved_tensors
        b, h, w, c = x.shape
        xf = x.reshape(b, h * w, c)
        dyf = dy.reshape(b, h * w, c)
        d_s = (dyf * xf).sum(dim=1, keepdim=True).to(g.dtype)  # dL/ds, (B, 1, C)
        d_gamma = (d_s * n).sum(dim=(0, 1)).to(gamma.dtype) if ctx.needs_input_grad[1] else None
        d_beta = dyf.sum(dim=(0, 1)).to(gamma.dtype) if ctx.needs_input_grad[2] else None
        d_x = None
        if ctx.needs_input_grad[0]:
            t = _grn_norm_grad(d_s, gamma, g, m, c)
            d_x = torch.addcmul(dyf * s, xf, t.to(s.dtype)).to(x.dtype).reshape(b, h, w, c)
        return d_x, d_gamma, d_beta, None


class GRN(nn.Module):
    """Global response normalisation of ConvNeXt V2, on channels-last ``(B, H, W, C)``.

    ``G = ‖x‖₂`` over H, W per channel; ``N = G / (mean_c G + eps)``; ``y = γ (x N) + β + x``
    with γ = β = 0 at initialisation (identity). Eager calls use ``_GRNFunction`` (the
    same values to float rounding, tested against :func:`grn_formula`, which compiled graphs
    use). On a CPU a :class:`ConvNeXtBlock` does not call it: it folds GRN into its pw2
    (``_FoldedMLP``).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"GRN: expected (B, H, W, C), got {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return grn_formula(x, self.gamma, self.beta, self.eps)
        return _GRNFunction.apply(x, self.gamma, self.beta, self.eps)


class _FoldedMLP(torch.autograd.Function):
    """``GRN(GELU(x W1ᵀ + b1)) W2ᵀ + b2`` on ``x (B, H, W, C)``, with GRN folded into W2.

    GRN scales each image's channels, ``GRN(a) = a ⊙ s + β`` with ``s = 1 + γ N`` of shape
    ``(B, 1, 4C)``, so ``GRN(a) W2ᵀ = a (s ⊙ W2)ᵀ + β W2ᵀ``: one batched product with a
    per-image weight. GRN's output, a full-resolution ×4 map, is then neither written in the
    forward nor saved and read in the backward; the backward gets ``∂L/∂s`` from the small
    ``aᵀ ∂L/∂out`` that pw2's weight gradient needs anyway. Only the gradients autograd asks
    for are computed: none of the weights' when all are frozen (the follower in the leader
    step), and only those of the trainable ones when some are. Float32 or float64, no
    autocast.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, gamma, beta, w2, b2, eps: float):
        b, h, w, c = x.shape
        pre = torch.addmm(b1, x.reshape(b * h * w, c), w1.t())  # (BP, 4C), P = H·W
        a = F.gelu(pre).reshape(b, h * w, -1)  # (B, P, 4C)
        if env_setting("FUSE4SEG_GRN_NORM") == "vector_norm":  # the code before 2026-12-06
            g = torch.linalg.vector_norm(a, dim=1, keepdim=True)  # ‖a‖ over H, W: (B, 1, 4C)
        else:
            g = _pixel_norm(a)
        m = g.mean(dim=-1, keepdim=True) + eps  # (B, 1, 1)
        n = g / m
        s = 1 + gamma * n  # (B, 1, 4C)
        out = torch.baddbmm(b2 + beta @ w2.t(), a, s.transpose(1, 2) * w2.t())  # (B, P, C)
        ctx.save_for_backward(x, w1, pre, a, gamma, beta, w2, g, m, n, s)
        return out.reshape(b, h, w, -1)

    @staticmethod
    def backward(ctx, d_out):
        x, w1, pre, a, gamma, beta, w2, g, m, n, s = ctx.saved_tensors
        b, h, w, c = x.shape
        c4 = a.shape[-1]
        do = d_out.reshape(b, h * w, -1)  # (B, P, C)
        at_do = torch.bmm(a.transpose(1, 2), do)  # (B, 4C, C)
        d_s = (at_do * w2.t()).sum(-1).unsqueeze(1)  # ∂L/∂s, (B, 1, 4C)
        t = _grn_norm_grad(d_s, gamma, g, m, c4)
        d_a = torch.bmm(do, w2 * s).addcmul_(a, t)  # (B, P, 4C)
        d_pre = torch.ops.aten.gelu_backward(d_a.reshape(b * h * w, c4), pre)
        need = ctx.needs_input_grad  # x, w1, b1, γ, β, w2, b2, eps
        d_x = (d_pre @ w1).reshape(b, h, w, c) if need[0] else None
        d_b2 = do.sum(dim=(0, 1)) if any(need[4:7]) else None
        # each weight's gradient only when asked for: none in the leader step (all frozen)
        grads = (
            d_pre.t() @ x.reshape(b * h * w, c) if need[1] else None,  # w1
            d_pre.sum(0) if need[2] else None,  # b1
            (d_s * n).sum(dim=(0, 1)) if need[3] else None,  # γ
            d_b2 @ w2 if need[4] else None,  # β
            ((s.transpose(1, 2) * at_do).sum(0).t() + d_b2[:, None] * beta
             if need[5] else None),  # w2, (C, 4C)
            d_b2 if need[6] else None,  # b2
        )
        return (d_x, *grads, None)


class _DepthwiseByForward(torch.autograd.Function):
    """A k×k depthwise convolution (padding k // 2, bias) whose two gradients are depthwise
    *forward* convolutions.

    On a CPU oneDNN computes the weight gradient of a channels-last depthwise convolution with
    its general kernel (16×16 channel blocks, a dense convolution's), 6-13× the forward's time
    for the follower's 7×7 convolutions (``benchmarks/probe_follower.py``). Here
    ``∂L/∂W[c] = Σ_b pad(x)[b, c] ⋆ ∂L/∂y[b, c]``: a forward depthwise convolution of the
    padded input with the output gradient as its (H × W) kernel, the images folded into the
    channels (:func:`depthwise_weight_grad`); ``∂L/∂x`` is the forward convolution of
    ``∂L/∂y`` with the flipped kernel. The same values to float rounding (tested in float64).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        c, k = x.shape[1], weight.shape[-1]
        p = k // 2
        need = ctx.needs_input_grad  # x, weight, bias
        d_x = F.conv2d(gy, weight.flip(-1, -2), padding=p, groups=c) if need[0] else None
        d_w = depthwise_weight_grad(x, gy, k) if need[1] else None  # not when frozen
        return d_x, d_w, gy.sum(dim=(0, 2, 3)) if need[2] else None


def depthwise_weight_grad(x: torch.Tensor, gy: torch.Tensor, k: int) -> torch.Tensor:
    """``∂L/∂W`` ``(C, 1, k, k)`` of a k×k depthwise convolution (padding k // 2) from its
    input ``x`` and output gradient ``gy`` (both ``(B, C, H, W)``).

    ``∂L/∂W[c] = Σ_b pad(x)[b, c] ⋆ gy[b, c]``: one depthwise forward convolution of ``x``
    with the B·C images × channels folded into its channels and ``gy`` as their (H × W)
    kernels, padded by the convolution's own ``padding`` (output k × k, no padded copy of
    ``x``), then the sum over the images. Until 2026-12-04 this ran in chunks of at most 64
    images × channels, each padded with ``F.pad``; ``benchmarks/probe_follower.py`` times the
    two against each other and against oneDNN: one call was 1.5-6.9× faster than the chunks
    and 1.6-4.2× faster than oneDNN at every follower shape, in three runs
    (``benchmarks/RESULTS.md``, "The follower's ConvNeXt blocks on a CPU", runs F-H). Its
    extra memory is the ``(1, B·C, k, k)`` output and, for channels-last ``x`` or ``gy``
    (the follower's), one NCHW copy of each for the fold (a view when already NCHW): at
    most one more copy of the two maps, where the chunks held one chunk's worth at a
    time."""
    b, c, h, w = x.shape
    folded = F.conv2d(x.reshape(1, b * c, h, w), gy.reshape(b * c, 1, h, w),
                      padding=k // 2, groups=b * c)  # (1, B·C, k, k)
    return folded.reshape(b, c, k, k).sum(0).unsqueeze(1)


def _cpu_kernels(x: torch.Tensor) -> bool:
    """Whether a ConvNeXt block on ``x`` runs ``_DepthwiseByForward`` and
    ``_FoldedMLP``: eager float on a CPU without autocast, unless ``FUSE4SEG_CONVNEXT=
    autograd``."""
    return cpu_float_eager(x, "FUSE4SEG_CONVNEXT", "autograd")


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt V2 block (§3.4): 7×7 depthwise conv, LayerNorm, inverted bottleneck (×4) with
    GELU and GRN, residual. ``(B, C, H, W) -> (B, C, H, W)``.

    On a CPU (float, no autocast) the depthwise convolution runs as
    ``_DepthwiseByForward`` and ``pw1 → GELU → GRN → pw2`` as ``_FoldedMLP``: the
    same maths with fewer passes over memory and without oneDNN's slow depthwise weight
    gradient. On the ``default`` profile (AMD EPYC, 2 threads; ``benchmarks/probe_follower.py``)
    the warm-up step became 1.07-1.12× and the outer step 1.02-1.06× faster in five runs
    with the weight gradient in chunks; with it in one call, as now, 1.20-1.23× and
    1.10-1.15× in two of three runs, and 1.02× and 0.90× (slower) in the third
    (``benchmarks/RESULTS.md``, "The follower's ConvNeXt blocks on a CPU"). Elsewhere,
    and with ``FUSE4SEG_CONVNEXT=autograd``, the block runs as written and autograd
    differentiates it (GRN: :class:`GRN`).
    """

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, dim * expansion)
        self.grn = GRN(dim * expansion)
        self.pw2 = nn.Linear(dim * expansion, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = _cpu_kernels(x)
        return self.forward_parts(x, folded_mlp=fast, depthwise_by_forward=fast)

    def forward_parts(self, x: torch.Tensor, folded_mlp: bool, depthwise_by_forward: bool
                      ) -> torch.Tensor:
        """The block with each CPU rewrite on or off (``benchmarks/probe_follower.py`` times
        each alone); ``forward`` chooses both together."""
        conv = self.dwconv
        if depthwise_by_forward:
            y = _DepthwiseByForward.apply(x, conv.weight, conv.bias)
        else:
            y = conv(x)
        y = self.norm(y.permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
        if folded_mlp:
            y = _FoldedMLP.apply(y, self.pw1.weight, self.pw1.bias, self.grn.gamma,
                                 self.grn.beta, self.pw2.weight, self.pw2.bias, self.grn.eps)
        else:
            y = self.pw2(self.grn(F.gelu(self.pw1(y))))  # (B, H, W, 4C) -> (B, H, W, C)
        return x + y.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class TransformerBottleneckBlock(nn.Module):
    """Pre-norm transformer block on the lowest-resolution map (§3.4): conv position encoding,
    multi-head self-attention over the h·w tokens, MLP ×4. ``(B, C, h, w) -> (B, C, h, w)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"bottleneck: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x + self.pos(x)  # conditional position encoding
        t = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, N, C), N = h·w
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)  # 3 × (B, N, C)
        q, k, v = (
            z.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v)
        )
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        t = t + self.proj(a.transpose(1, 2).reshape(b, h * w, c))  # (B, N, C)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> (B, C, h, w)


class Downsample(nn.Module):
    """LayerNorm then a 2×2 stride-2 conv: ``(B, C, H, W) -> (B, C', H/2, W/2)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = LayerNorm2d(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class UpStage(nn.Module):
    """2×2 transposed conv up, concatenate the skip, 1×1 conv merge, ConvNeXt blocks.

    ``(B, C_low, h, w), skip (B, C, 2h, 2w) -> (B, C, 2h, 2w)``.
    """

    def __init__(self, dim_low: int, dim: int, depth: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim_low, dim, 2, stride=2)
        self.merge = nn.Conv2d(dim * 2, dim, 1)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C_low, h, w) -> (B, C, 2h, 2w)
        x = self.merge(torch.cat([x, skip], dim=1))  # (B, 2C, 2h, 2w) -> (B, C, 2h, 2w)
        return self.blocks(x)


class ConvNeXtUNet(nn.Module):
    """The segmentation follower Ψ (§3.4): ``logits = follower(x)``.

    Args:
        in_channels: 1 for the fused prior x_f, 2 for the direct multi-channel baseline.
        num_classes: 4 (background, NCR, ED, ET).
        dims: channels per level, highest resolution first; the last is the bottleneck's. With
            ``len(dims) = L`` the network down-samples ``L - 1`` times (stride ``2**(L-1)``).
        depths: ConvNeXt blocks per encoder level (``len(dims) - 1`` values).
        up_depths: ConvNeXt blocks per decoder level (same length as ``depths``).
        bottleneck_blocks: transformer blocks at the lowest resolution.
        heads: attention heads of the bottleneck.

    Attributes:
        stride: H and W must be divisible by it.
        in_channels, num_classes.

    Forward:
        x: ``(B, in_channels, H, W)``. Returns logits ``(B, num_classes, H, W)`` (in x's dtype
        under autocast).

    Raises:
        ValueError: wrong rank or channel count, or H/W not divisible by ``stride``.

    Explained in chapter 3 (``book/03_segmentation_follower.md``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        dims: tuple[int, ...] = (32, 64, 96, 128, 192),
        depths: tuple[int, ...] = (1, 1, 2, 2),
        up_depths: tuple[int, ...] = (1, 1, 1, 1),
        bottleneck_blocks: int = 2,
        heads: int = 8,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"follower: in_channels must be >= 1, got {in_channels}")
        if len(dims) < 2 or len(depths) != len(dims) - 1 or len(up_depths) != len(depths):
            raise ValueError(
                f"follower: need len(depths) == len(up_depths) == len(dims) - 1, got dims={dims}, "
                f"depths={depths}, up_depths={up_depths}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stride = 2 ** (len(dims) - 1)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], 3, padding=1), LayerNorm2d(dims[0])
        )
        self.enc = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n)))
            for d, n in zip(dims[:-1], depths, strict=True)
        )
        self.down = nn.ModuleList(
            Downsample(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.bottleneck = nn.Sequential(
            *(TransformerBottleneckBlock(dims[-1], heads) for _ in range(bottleneck_blocks))
        )
        self.up = nn.ModuleList(
            UpStage(dims[i + 1], dims[i], up_depths[i]) for i in reversed(range(len(depths)))
        )
        self.head = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"follower: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        check_divisible(x, self.stride, "follower")
        x = self.stem(x)  # (B, in, H, W) -> (B, C0, H, W)
        skips = []
        for blocks, down in zip(self.enc, self.down, strict=True):
            x = blocks(x)
            skips.append(x)
            x = down(x)  # (B, Ci, h, w) -> (B, Ci+1, h/2, w/2)
        x = self.bottleneck(x)  # (B, C_last, H/stride, W/stride)
        for stage, skip in zip(self.up, reversed(skips), strict=True):
            x = stage(x, skip)  # (B, Ci+1, h, w) -> (B, Ci, 2h, 2w)
        return self.head(x)  # (B, C0, H, W) -> (B, num_classes, H, W)
