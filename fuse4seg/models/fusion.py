"""The fusion leader Φ of §3.3: a frequency-decoupled encoder, learnable fusion units, a decoder.

Explained in chapter 2 (``book/02_fusion_leader.md``). The file reads top-down: building blocks
(per-pixel LayerNorm, Restormer block, low-frequency attention block, the invertible INN) → the
leader :class:`FusionLeader` → its registered variants live in ``fuse4seg.models.registry``.

Data flow of ``leader(x1, x2)`` (x1 = T1ce, x2 = FLAIR, each ``(B, 1, H, W)`` in [0, 1]):

1. A shared 3×3 patch embedding and shared Restormer blocks encode each source (§3.3.1); the
   two sources go through the same weights in one batched pass.
2. The encoder splits into a low-frequency branch (multi-head attention + MLP) giving
   ``F_low^k`` and a high-frequency branch (INN blocks with affine coupling, Eq. 5) giving
   ``F_high^k``.
3. Fusion units (Eq. 6): ``H_low(F_low^1 + F_low^2)`` and ``H_high(F_high^1 + F_high^2)``.
4. A Restormer ("transformer") decoder on the concatenated fused features, a small conv head to
   one channel, plus the anchor x_avg = (x1 + x2)/2 (``model.source_skip``, on in every
   profile), then per-image min-max normalisation to [0, 1] (§3.3.2); with
   ``model.anchor_range`` (``default``), mapped onto x_avg's own range.

Choices where the paper is silent or ambiguous (also stated in chapter 2):

- **Attention type.** Both the Restormer blocks and the "multi-head self-attention" of the
  low-frequency branch attend across *channels* (transposed attention, as in Restormer and in
  CDDFuse's reference code): a spatial attention over 240 × 240 = 57,600 tokens compares
  57,600² ≈ 3.3 × 10⁹ pairs per head and block; memory-efficient kernels avoid storing that
  matrix (13 GB per head in fp32), not computing it.
- **Haar squeeze.** §3.3.1 says the INN block squeezes with a Haar wavelet; CDDFuse's reference
  code (which the paper says it follows) has no squeeze. Both are implemented
  (``inn_squeeze``). The paper's text and the code it names are at odds (it attributes the
  squeeze to "the architectural design of CDDFuse"), and the paper has no code of its own, so
  the ``paper`` profile follows the code: ``inn_squeeze=False``. This is a judgement, not
  a measurement; ``--set model.inn_squeeze=true`` gives the text's reading. With the squeeze,
  H and W must be even (``leader.stride == 2``).
- **Channel mixing between couplings.** CDDFuse mixes channels with a plain 1×1 convolution
  before each coupling, which is not guaranteed invertible. We use a Glow-style invertible 1×1
  convolution (LU-parameterised, so it stays invertible while it learns), which keeps the INN
  exactly invertible (:meth:`INN.inverse`).
- **Bounded log-scale.** The log-scale of Eq. 5 is ``s = c · tanh(ρ(z2) / c)`` with
  ``c = inn_clamp`` (2.0), so ``exp(s) ∈ [e^-2, e^2]`` cannot overflow under bf16/fp16 AMP.
- **Coupling networks** ρ, η, φ are inverted-residual conv blocks (1×1 expand ×2, ReLU6,
  3×3 depthwise with reflection padding, ReLU6, 1×1), the "dense convolutional blocks" of
  CDDFuse.
- **Output range.** CDDFuse ends with a sigmoid and adds the input image back; the paper's
  decoder is "anchor-free" and ends with min-max normalisation. We end with the min-max, per
  image, in float32: ``(y - min) / max(max - min, 1e-5)``, which is 0 on a constant image.
- **The anchor added back.** Before that min-max we add x_avg to the decoder's output, as
  CDDFuse adds a source image, though the paper calls its decoder "anchor-free": without it the
  polarity of x_f is left to the random initialisation (:class:`FusionLeader`'s
  ``source_skip``, measured by ``benchmarks/probe_polarity.py``). ``model.source_skip=false``
  gives the literal reading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuse4seg.models.layers import LayerNorm2d, check_divisible, cpu_eager, cpu_float_eager

__all__ = [
    "AffineCoupling",
    "DepthwiseConv2d",
    "FusionLeader",
    "GatedFeedForward",
    "INN",
    "InvertibleConv1x1",
    "LowFrequencyBlock",
    "RestormerBlock",
    "TransposedAttention",
    "haar_squeeze",
    "haar_unsqueeze",
    "minmax_normalize",
]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class DepthwiseConv2d(nn.Conv2d):
    """A 3×3 depthwise convolution ``(B, C, H, W) -> (B, C, H, W)``, fast under bf16 AMP.

    Under bf16/fp16 autocast on an H100, cuDNN picks a slow direct kernel for grouped
    convolutions over the leader's full-resolution maps (38% of a paper-variant training step,
    measured with ``torch.profiler``), which made AMP slower than float32. On CUDA with reduced
    precision this layer therefore runs PyTorch's native depthwise kernel (cuDNN off for this
    call only): a paper-variant step at batch 8 went from 405 to 290 ms with the memory of bf16
    (``benchmarks/bench_models.py``). Same weights and state-dict keys as ``nn.Conv2d``.
    """

    def __init__(self, channels: int, padding: int = 1, bias: bool = False):
        super().__init__(channels, channels, 3, padding=padding, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")
        if x.is_cuda and reduced:
            with torch.backends.cudnn.flags(enabled=False):
                return super().forward(x)
        return super().forward(x)


class TransposedAttention(nn.Module):
    """Multi-head attention across channels (Restormer's MDTA; CDDFuse's attention).

    Queries, keys and values come from a 1×1 then a 3×3 depthwise convolution; each head forms
    a ``(C/h) × (C/h)`` attention map from L2-normalised queries and keys over all pixels, scaled
    by a learnt temperature, so the cost is linear in H·W.

    On a CPU (eager, float, no autocast) the attention itself runs as
    ``_ChannelAttention``, the same maths on the channels-last map with a hand-written
    backward: the module's forward and backward became 2.0-2.3× faster on the ``default``
    profile's leader at 80×80 (2-vCPU Intel Xeon, two threads; ``benchmarks/RESULTS.md``,
    "The leader's attention with a hand-written backward"). ``FUSE4SEG_ATTENTION=autograd``
    runs the form below instead, as GPUs and compiled graphs always do (not measured there).

    Args:
        dim: channels C (divisible by ``heads``).
        heads: number of heads h.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dw = DepthwiseConv2d(dim * 3, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_dw(self.qkv(x))  # (B, 3C, H, W)
        if _cpu_attention(qkv):
            t = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3 * c)  # a view, dense if CL
            d = c // self.heads
            temperature = self.temperature.reshape(self.heads, 1).repeat_interleave(d, 0)
            head = torch.arange(c, device=x.device) // d
            out = _ChannelAttention.apply(t, temperature, head[:, None] != head[None, :])
            return self.proj(out.reshape(b, h, w, c).permute(0, 3, 1, 2))  # (B, C, H, W)
        q, k, v = qkv.chunk(3, dim=1)  # 3 × (B, C, H, W)
        # (B, C, H, W) -> (B, heads, C/heads, H*W)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, C/h, C/h)
        out = attn.softmax(dim=-1) @ v  # (B, heads, C/h, H*W)
        return self.proj(out.reshape(b, c, h, w))


def _cpu_attention(qkv: torch.Tensor) -> bool:
    """Whether :class:`TransposedAttention` runs :class:`_ChannelAttention`: eager float on a
    CPU without autocast, unless ``FUSE4SEG_ATTENTION=autograd``."""
    return cpu_float_eager(qkv, "FUSE4SEG_ATTENTION", "autograd")


class _ChannelAttention(torch.autograd.Function):
    """The core of :class:`TransposedAttention` on a CPU, with a hand-written backward:
    ``t (B, HW, 3C) = [q, k, v]`` per pixel, the channels-last map as a matrix, to
    ``out (B, HW, C)``.

    Per head, ``softmax(τ · q̂ᵀ k̂) v`` with q̂, k̂ the queries and keys L2-normalised over the
    pixels (``F.normalize``: the norm clamped below at 1e-12). Two things make it cheaper than
    the autograd form, which reshapes q, k and v to ``(B, heads, C/h, HW)`` copies,
    normalises the two full maps and concatenates the three gradients in its backward:

    - the normalisation is moved onto the small Gram matrix,
      ``q̂ᵀ k̂ = diag(1/‖q‖) (qᵀ k) diag(1/‖k‖)``, so no normalised map is made or saved;
    - every head is one ``(C × C)`` matrix per image, the entries between two heads masked to
      −∞ before the softmax (their weights are then exactly 0): the products run on the
      channels-last matrix ``t`` as it is, and the backward writes ``∂L/∂t`` whole, with one
      matrix product for ``∂L/∂q`` and ``∂L/∂k`` together.

    The Gram matrix has h times the entries the heads need (twice for the two heads of
    ``fuse4seg_tiny`` and ``fuse4seg_small``, 8 times for ``paper``'s), and the backward's
    ``(2C × 2C)`` product about 2h times the per-head work: small next to the passes over the
    maps it saves at these sizes. The same values to float rounding (tested against the
    autograd form in float64, a zero query channel included, and by ``gradcheck``). No double
    backward (nothing in the package differentiates a gradient).
    """

    EPS = 1e-12
    """``F.normalize``'s default: a norm below it is taken as it (the autograd form's)."""

    @staticmethod
    def forward(ctx, t, temperature, off_head):
        eps = _ChannelAttention.EPS
        c = t.shape[2] // 3
        q, k, v = t.split(c, dim=2)  # 3 × (B, HW, C), views
        nq = torch.linalg.vector_norm(q, dim=1)  # (B, C)
        nk = torch.linalg.vector_norm(k, dim=1)
        nq_c, nk_c = nq.clamp_min(eps), nk.clamp_min(eps)
        r = torch.bmm(q.transpose(1, 2), k).div_(nq_c[:, :, None]).div_(nk_c[:, None, :])
        a = (r * temperature).masked_fill_(off_head, float("-inf")).softmax(-1)  # (B, C, C)
        ctx.save_for_backward(t, temperature, r, a, nq_c, nk_c, nq >= eps, nk >= eps)
        return torch.bmm(v, a.transpose(1, 2))  # (B, HW, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        t, temperature, r, a, nq_c, nk_c, q_on, k_on = ctx.saved_tensors
        b, _, c3 = t.shape
        c = c3 // 3
        d_a = torch.bmm(d_out.transpose(1, 2), t[:, :, 2 * c:])  # (B, C, C)
        d_s = a * (d_a - (d_a * a).sum(-1, keepdim=True))  # softmax's backward
        d_temperature = (d_s * r).sum(dim=(0, 2)).unsqueeze(1)  # (C, 1)
        d_r = d_s * temperature
        d_rr = d_r * r
        # the norms: ∂‖q_i‖/∂q_i = q_i / ‖q_i‖, nothing where the clamp holds
        s_q = -(d_rr.sum(-1) / nq_c.square()) * q_on  # (B, C)
        s_k = -(d_rr.sum(-2) / nk_c.square()) * k_on
        d_g = d_r.div(nq_c[:, :, None]).div_(nk_c[:, None, :])  # ∂L/∂(qᵀ k)
        # [∂q, ∂k] = [q, k] · [[diag(s_q), d_g], [d_gᵀ, diag(s_k)]]; ∂v = ∂out · a
        m = t.new_zeros(b, 2 * c, 2 * c)
        m[:, :c, :c].diagonal(dim1=1, dim2=2).copy_(s_q)
        m[:, c:, c:].diagonal(dim1=1, dim2=2).copy_(s_k)
        m[:, :c, c:] = d_g
        m[:, c:, :c] = d_g.transpose(1, 2)
        d_t = torch.empty_like(t)  # t's strides: channels-last, or NCHW's column-major view
        # each product straight into its columns of d_t (no copy on torch 2.13's CPU)
        torch.bmm(t[:, :, :2 * c], m, out=d_t[:, :, :2 * c])
        torch.bmm(d_out, a, out=d_t[:, :, 2 * c:])
        return d_t, d_temperature, None


class GatedFeedForward(nn.Module):
    """Restormer's gated-Dconv feed-forward: ``W_out(GELU(DW(W_1 x)) ⊙ DW(W_2 x))``.

    On a CPU the leader's maps are channels-last
    (:func:`~fuse4seg.models.registry.place_leader`), so ``chunk(2, dim=1)`` gives two strided
    halves, and GELU's CPU kernel leaves its vectorised path on a strided input. Eager CPU
    calls therefore copy the gate dense (channels-last) before GELU: GELU(gate) · value,
    forward and backward, became 3.6-4.6× faster in five runs of
    ``benchmarks/probe_cpu_levers.py`` on an Intel Xeon. The ``default`` profile's whole outer
    step gained 1.01-1.09× in the same runs, which is within its spread there
    (``benchmarks/RESULTS.md``, "Three more levers"). The same values to float rounding
    (GELU's vectorised erf rounds differently; whole runs over 3 seeds stay within the noise
    of a change of seed). Its cost: GELU saves the dense copy for the backward, where it saved
    a view of the convolution's output that ``value`` keeps anyway, so each block holds one
    more ``(B, hid, H, W)`` map until the backward. ``FUSE4SEG_GATE=strided`` keeps the
    strided gate; GPUs and compiled graphs never copy.
    """

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = DepthwiseConv2d(hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)  # 2 × (B, hid, H, W)
        if _copy_gate(gate):
            gate = gate.contiguous(memory_format=torch.channels_last)
        return self.project_out(F.gelu(gate) * value)  # (B, hid, H, W) -> (B, C, H, W)


def _copy_gate(gate: torch.Tensor) -> bool:
    """Whether :class:`GatedFeedForward` copies its gate dense: a channels-last half (channel
    stride 1, not dense) on a CPU, eager, unless ``FUSE4SEG_GATE=strided``."""
    return (gate.device.type == "cpu" and gate.stride(1) == 1
            and not gate.is_contiguous(memory_format=torch.channels_last)
            and cpu_eager(gate, "FUSE4SEG_GATE", "strided"))


class RestormerBlock(nn.Module):
    """A Restormer block (§3.3.1, shared encoder and decoder): pre-norm transposed multi-head
    attention and gated-Dconv feed-forward, each with a residual connection."""

    def __init__(self, dim: int, heads: int, ffn_expansion: float = 2.0, bias: bool = False):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = TransposedAttention(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GatedFeedForward(dim, ffn_expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, C, H, W)
        return x + self.ffn(self.norm2(x))  # (B, C, H, W)


class LowFrequencyBlock(nn.Module):
    """The low-frequency extractor (§3.3.1) and H_low (Eq. 6): multi-head attention + MLP.

    Pre-norm multi-head (channel) attention, then a plain per-pixel MLP (1×1 conv, GELU, 1×1
    conv, ×``mlp_ratio``), each residual. The paper says only "MSA and MLP layers", and we take
    "MLP" literally: ungated, with no depthwise convolution. CDDFuse's base-feature block is
    not this: its ``Mlp`` is gated (``gelu(x1)·x2`` after a 3×3 depthwise convolution, like
    :class:`GatedFeedForward`) with expansion 1.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm2d(dim)
        self.attn = TransposedAttention(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=bias), nn.GELU(), nn.Conv2d(hidden, dim, 1, bias=bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, C, H, W)
        return x + self.mlp(self.norm2(x))  # (B, C, H, W)


# --- the invertible high-frequency branch (Eq. 5) --------------------------------------------
def haar_squeeze(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D Haar transform as a squeeze: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``.

    Channels ``[0:C]`` hold the average (LL) sub-band, then LH, HL, HH. Orthonormal (each output
    is a ±1/2-weighted sum of a 2×2 block), so :func:`haar_unsqueeze` inverts it exactly.

    Raises:
        ValueError: H or W odd.
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Haar squeeze needs even H and W, got {h}x{w}")
    a = x[:, :, 0::2, 0::2]
    b_ = x[:, :, 0::2, 1::2]
    c_ = x[:, :, 1::2, 0::2]
    d = x[:, :, 1::2, 1::2]
    ll = (a + b_ + c_ + d) * 0.5
    lh = (a - b_ + c_ - d) * 0.5  # horizontal detail
    hl = (a + b_ - c_ - d) * 0.5  # vertical detail
    hh = (a - b_ - c_ + d) * 0.5  # diagonal detail
    return torch.cat([ll, lh, hl, hh], dim=1)  # (B, 4C, H/2, W/2)


def haar_unsqueeze(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_squeeze`: ``(B, 4C, H/2, W/2) -> (B, C, H, W)``."""
    b, c4, h, w = y.shape
    if c4 % 4:
        raise ValueError(f"Haar unsqueeze needs a channel count divisible by 4, got {c4}")
    ll, lh, hl, hh = y.chunk(4, dim=1)
    a = (ll + lh + hl + hh) * 0.5
    b_ = (ll - lh + hl - hh) * 0.5
    c_ = (ll + lh - hl - hh) * 0.5
    d = (ll - lh - hl + hh) * 0.5
    x = y.new_empty(b, c4 // 4, h * 2, w * 2)
    x[:, :, 0::2, 0::2] = a
    x[:, :, 0::2, 1::2] = b_
    x[:, :, 1::2, 0::2] = c_
    x[:, :, 1::2, 1::2] = d
    return x


class InvertibleConv1x1(nn.Module):
    """A learnable, always-invertible 1×1 convolution (Glow), ``W = P · L · (U + diag(s))``.

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular and
    ``s = sign · exp(log|s|)`` never zero, so W stays invertible while it learns. Initialised
    to a random rotation. Replaces CDDFuse's plain 1×1 "shuffle" convolution (module docstring).
    """

    def __init__(self, channels: int):
        super().__init__()
        w0 = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        """The ``(C, C)`` matrix W."""
        lower = torch.tril(self.lower, -1) + self.eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight()[:, :, None, None])  # (B, C, H, W) -> (B, C, H, W)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight().to(torch.float64)).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class CouplingNet(nn.Module):
    """ρ, η or φ of Eq. 5: an inverted-residual block (1×1 ×2, ReLU6, 3×3 DW, ReLU6, 1×1)."""

    def __init__(self, channels: int, expansion: int = 2):
        super().__init__()
        hidden = channels * expansion
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU6(inplace=True),
            nn.ReflectionPad2d(1),
            DepthwiseConv2d(hidden, padding=0),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, C, H, W) -> (B, C, H, W)


class AffineCoupling(nn.Module):
    """One INN block: [Haar squeeze] → invertible 1×1 mix → affine coupling (Eq. 5) → [unsqueeze].

    With ``z = [z1, z2]`` split along channels (Eq. 5)::

        z1' = z1 ⊙ exp(s) + η(z2),   s = c · tanh(ρ(z2) / c)   (bounded log-scale)
        z2' = z2 + φ(z1')

    Args:
        channels: C of the input ``(B, C, H, W)``; C (or 4C with the squeeze) must be even.
        squeeze: apply the Haar squeeze (§3.3.1) around the coupling; needs even H and W.
        clamp: c, the bound of the log-scale.

    The output has the input's shape; :meth:`inverse` undoes ``forward`` exactly (up to
    floating-point rounding).
    """

    def __init__(self, channels: int, squeeze: bool = False, clamp: float = 2.0):
        super().__init__()
        inner = channels * 4 if squeeze else channels
        if inner % 2:
            raise ValueError(f"INN: the coupling needs an even channel count, got {inner}")
        self.squeeze = squeeze
        self.clamp = clamp
        half = inner // 2
        self.mix = InvertibleConv1x1(inner)
        self.rho = CouplingNet(half)
        self.eta = CouplingNet(half)
        self.phi = CouplingNet(half)

    def _log_scale(self, z2: torch.Tensor) -> torch.Tensor:
        return self.clamp * torch.tanh(self.rho(z2) / self.clamp)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.squeeze:
            z = haar_squeeze(z)  # (B, C, H, W) -> (B, 4C, H/2, W/2)
        z1, z2 = self.mix(z).chunk(2, dim=1)  # 2 × (B, C'/2, h, w)
        z1 = z1 * torch.exp(self._log_scale(z2)) + self.eta(z2)  # Eq. 5, first half
        z2 = z2 + self.phi(z1)  # Eq. 5, second half
        z = torch.cat([z1, z2], dim=1)  # (B, C', h, w)
        return haar_unsqueeze(z) if self.squeeze else z

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """The input of ``forward`` from its output: the two halves of Eq. 5 undone in
        reverse order, then the 1×1 mix."""
        if self.squeeze:
            z = haar_squeeze(z)
        z1, z2 = z.chunk(2, dim=1)
        z2 = z2 - self.phi(z1)
        z1 = (z1 - self.eta(z2)) * torch.exp(-self._log_scale(z2))
        z = self.mix.inverse(torch.cat([z1, z2], dim=1))
        return haar_unsqueeze(z) if self.squeeze else z


class INN(nn.Module):
    """A stack of :class:`AffineCoupling` blocks: the high-frequency extractor and H_high.

    Args:
        channels: C of the ``(B, C, H, W)`` features.
        layers: number of INN blocks (3 in the encoder and 1 in H_high for the paper variant,
            as in CDDFuse).
        squeeze, clamp: see :class:`AffineCoupling`.
    """

    def __init__(self, channels: int, layers: int, squeeze: bool = False, clamp: float = 2.0):
        super().__init__()
        self.blocks = nn.ModuleList(AffineCoupling(channels, squeeze, clamp) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            z = block(z)  # (B, C, H, W) -> (B, C, H, W)
        return z

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of ``forward`` (tested to 1e-5 in float64)."""
        for block in reversed(self.blocks):
            z = block.inverse(z)
        return z


def minmax_normalize(y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1] (§3.3.2), computed in float32.

    Args:
        y: ``(B, C, H, W)``; each sample is normalised over all its C·H·W values.
        eps: lower bound of the denominator, so a constant image maps to 0 (finite, no NaN).

    Returns:
        float32 ``(B, C, H, W)`` in [0, 1].
    """
    y = y.float()
    lo = y.amin(dim=(1, 2, 3), keepdim=True)
    hi = y.amax(dim=(1, 2, 3), keepdim=True)
    return (y - lo) / (hi - lo).clamp_min(eps)


# ---------------------------------------------------------------------------------------------
# The leader
# ---------------------------------------------------------------------------------------------
class FusionLeader(nn.Module):
    """The fusion leader Φ (§3.3): ``x_fused, feats = leader(x1, x2)``.

    Args:
        dim: feature channels C (64 in the paper variant, as CDDFuse).
        heads: attention heads (8 in the paper variant).
        encoder_blocks: shared Restormer blocks of the encoder (4).
        decoder_blocks: Restormer blocks of the decoder (4).
        low_blocks: attention + MLP blocks of the low-frequency extractor (1).
        inn_layers: INN blocks of the high-frequency extractor (3).
        fuse_low_blocks: blocks of H_low (1).  fuse_inn_layers: INN blocks of H_high (1).
        ffn_expansion: Restormer feed-forward expansion (2).  mlp_ratio: low-branch MLP (2).
        inn_squeeze: Haar squeeze inside the INN blocks (module docstring; False for ``paper``).
        inn_clamp: bound of the coupling log-scale.
        source_skip: add the reconstruction anchor (x1 + x2)/2 to the decoder's output before
            the min-max normalisation, so the decoder learns a residual. The paper calls its
            decoder "anchor-free" yet CDDFuse's decoder adds a source image to its output; we
            keep the skip (default) because without it the polarity of x_f is left to the
            random initialisation: L_grad and L_decomp score an image and its negative alike,
            and γ·L_recon (γ = 0.05) is too weak to cross that barrier. Measured on the phantom
            by ``benchmarks/probe_polarity.py`` over 5 seeds (``benchmarks/RESULTS.md``, "The
            polarity of x_f"): after 60 steps of the physical losses the ``fuse4seg_tiny``
            leader's x_f ended inverted in 4 of 5 seeds without the skip, upright in all 5 with
            it. ``source_skip=False`` gives the literal reading. With the
            skip the head's last convolution starts scaled by 0.01, so the untrained leader
            outputs ≈ minmax(x_avg): the follower's warm-up prior x_avg after the per-image
            min-max (and, with ``anchor_range``, on x_avg's own range, i.e. ≈ x_avg).
        anchor_range: after the min-max normalisation, map x_f linearly onto the intensity
            range [min, max] of the anchor x_avg = (x1 + x2)/2 of the same image, so x_f keeps
            the brightness of the follower's warm-up prior and stays in [0, 1]. Not in the
            paper (§3.3.2 min-max normalises x_f alone; ``False`` is the literal reading).
            Measured by ``benchmarks/probe_collapse.py`` (``benchmarks/RESULTS.md``, chapter
            4): with the literal reading the warmed-up follower meets a brighter image when the
            rollout starts and its validation Dice collapses; mapping x_f onto x_avg's range
            removes most of that fall. On (``model.anchor_range``) in the ``default`` profile.

    Attributes:
        stride: H and W must be divisible by it (2 with the Haar squeeze, else 1).

    Forward:
        x1, x2: ``(B, 1, H, W)`` sources in [0, 1] (T1ce, FLAIR).
        Returns ``x_fused`` ``(B, 1, H, W)`` float32 in [0, 1] and
        ``feats = (f_low1, f_high1, f_low2, f_high2)``, each ``(B, C, H, W)``, the encoder
        features that ``fuse4seg.losses.decomp_loss`` needs.

    Raises:
        ValueError: shapes that differ, are not ``(B, 1, H, W)``, or H/W not divisible by stride.

    Explained in chapter 2 (``book/02_fusion_leader.md``).
    """

    def __init__(
        self,
        dim: int = 64,
        heads: int = 8,
        encoder_blocks: int = 4,
        decoder_blocks: int = 4,
        low_blocks: int = 1,
        inn_layers: int = 3,
        fuse_low_blocks: int = 1,
        fuse_inn_layers: int = 1,
        ffn_expansion: float = 2.0,
        mlp_ratio: float = 2.0,
        inn_squeeze: bool = False,
        inn_clamp: float = 2.0,
        source_skip: bool = True,
        anchor_range: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.source_skip = source_skip
        self.anchor_range = anchor_range
        self.inn_squeeze = inn_squeeze
        self.stride = 2 if inn_squeeze else 1
        # §3.3.1: shared encoder over each source
        self.embed = nn.Conv2d(1, dim, 3, padding=1, bias=False)
        self.encoder = nn.Sequential(
            *(RestormerBlock(dim, heads, ffn_expansion) for _ in range(encoder_blocks))
        )
        # §3.3.1: low-frequency (attention + MLP) and high-frequency (INN, Eq. 5) extractors
        self.low = nn.Sequential(
            *(LowFrequencyBlock(dim, heads, mlp_ratio) for _ in range(low_blocks))
        )
        self.high = INN(dim, inn_layers, inn_squeeze, inn_clamp)
        # Eq. 6: fusion units on the element-wise sums
        self.fuse_low = nn.Sequential(
            *(LowFrequencyBlock(dim, heads, mlp_ratio) for _ in range(fuse_low_blocks))
        )
        self.fuse_high = INN(dim, fuse_inn_layers, inn_squeeze, inn_clamp)
        # §3.3.2: transformer decoder to one channel
        self.reduce = nn.Conv2d(dim * 2, dim, 1, bias=False)
        self.decoder = nn.Sequential(
            *(RestormerBlock(dim, heads, ffn_expansion) for _ in range(decoder_blocks))
        )
        self.head = nn.Sequential(
            nn.Conv2d(dim, max(dim // 2, 1), 3, padding=1, bias=False),
            nn.LeakyReLU(0.01),
            nn.Conv2d(max(dim // 2, 1), 1, 3, padding=1, bias=False),
        )
        if source_skip:
            # Start as (almost) the identity prior: x_f ≈ minmax(x_avg), close to the follower's
            # warm-up input x_avg (Algorithm 1, stage 1); only the min-max's change of scale is
            # left, which model.anchor_range removes (chapter 4). Not exactly zero, so every
            # parameter still gets a gradient on the first step.
            with torch.no_grad():
                self.head[-1].weight.mul_(0.01)

    def _check(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        if x1.ndim != 4 or x1.shape[1] != 1:
            raise ValueError(f"leader: x1 must be (B, 1, H, W), got {tuple(x1.shape)}")
        if x1.shape != x2.shape:
            raise ValueError(
                f"leader: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must have the same shape"
            )
        check_divisible(x1, self.stride, "leader (Haar squeeze)")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared encoder + the two extractors: ``(N, 1, H, W) -> (F_low, F_high)``, each
        ``(N, C, H, W)``."""
        f = self.encoder(self.embed(x))  # (N, 1, H, W) -> (N, C, H, W)
        return self.low(f), self.high(f)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._check(x1, x2)
        b = x1.shape[0]
        # both sources through the shared weights in one pass: (2B, 1, H, W)
        f_low, f_high = self.encode(torch.cat([x1, x2], dim=0))  # 2 × (2B, C, H, W)
        f_low1, f_low2 = f_low[:b], f_low[b:]
        f_high1, f_high2 = f_high[:b], f_high[b:]
        fused_low = self.fuse_low(f_low1 + f_low2)  # Eq. 6, (B, C, H, W)
        fused_high = self.fuse_high(f_high1 + f_high2)  # Eq. 6, (B, C, H, W)
        y = self.reduce(torch.cat([fused_low, fused_high], dim=1))  # (B, 2C, H, W) -> (B, C, H, W)
        y = self.head(self.decoder(y))  # (B, C, H, W) -> (B, 1, H, W)
        if self.source_skip:
            y = y + 0.5 * (x1 + x2)  # residual on the anchor x_avg (see the class docstring)
        x_fused = minmax_normalize(y)  # (B, 1, H, W) in [0, 1], float32
        if self.anchor_range:  # onto [min, max] of x_avg: model.anchor_range (class docstring)
            anchor = 0.5 * (x1.float() + x2.float())
            lo = anchor.amin(dim=(1, 2, 3), keepdim=True)
            hi = anchor.amax(dim=(1, 2, 3), keepdim=True)
            x_fused = lo + x_fused * (hi - lo)
        return x_fused, (f_low1, f_high1, f_low2, f_high2)
