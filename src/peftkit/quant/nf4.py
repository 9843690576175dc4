"""NF4 storage for frozen weights: blockwise 4-bit NormalFloat with double quantization.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores a frozen weight ``W`` as

    s_b   = max_{i in b} |w_i|                                  (absmax of block b, B elements)
    q_i   = argmin_k |c_k - w_i / s_b|                           (c: the 16 NF4 values)
    w^_i  = c[q_i] * s_b                                         (dequantization)

and, with double quantization (DQ), also quantizes the fp32 scales ``s`` with 8-bit blockwise
"dynamic" codes over superblocks of 256 scales after removing their mean ``mu``:

    v_b   = s_b - mu,       t_k = max_{b in k} |v_b|,       p_b = Q8(v_b / t_k)
    s^_b  = d[p_b] * t_k + mu                                (d: the 256-value dynamic map)

which brings the constant overhead from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits/param.

Everything here is a pure tensor function, bit-exact with ``bitsandbytes.functional.quantize_4bit``
and ``dequantize_4bit`` (``quant_type="nf4"``, bitsandbytes 0.50.2 on CPU): same packed bytes,
same scales, same dequantized tensors. The rules that make that true:

* blocks run over the row-major flattened tensor and ignore row boundaries; the last may be partial;
* ``u = w * fl(1 / max(s_b, 1e-38))`` for full blocks but ``u = w / max(s_b, 1e-38)`` for the
  partial last block (bitsandbytes divides there), nearest code with ties to the lower code;
* two codes per byte, the even element in the high nibble; an odd count pads with the code of 0.0;
* ``mu = mean(s)`` (``torch.mean`` in fp32); the 8-bit codes follow bitsandbytes' CPU rounding
  (a 65,536-entry lookup table, not exact nearest; see ``nested_rounding``);
* ``w^ = fl(c[q] * s^)`` in fp32, then cast (round to nearest even) to the original dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import cast

import torch
from torch import Tensor

__all__ = [
    "NF4_CODEBOOK",
    "FP4_CODEBOOK",
    "DYNAMIC_CODEBOOK",
    "BLOCKSIZES",
    "NF4Tensor",
    "nf4_quantize",
    "nf4_dequantize",
]

# QLoRA Appendix E / bitsandbytes get_4bit_type("nf4"). Sorted, so the code equals the rank.
# Note: hard-coded on purpose: a float64 re-derivation from the normal quantiles is ~1 ulp off.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes' "fp4": bit 3 is the sign, the low 3 bits index [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12.
# Exported for reference and checkpoint inspection; quantization here is NF4 only.
FP4_CODEBOOK = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
).div_(12.0)


def _dynamic_codebook() -> Tensor:
    """The signed 8-bit "dynamic tree" map (arXiv 1511.04561) bitsandbytes uses for DQ.

    Level i = 0..6 holds the 2^i fp32 midpoints of linspace(0.1, 1, 2^i + 1) times fp32 10^(i-6),
    with both signs; add 0 and +1 and sort. It has no -1.0 (d[0] = -0.99296875).
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * torch.tensor(10.0 ** (i - 6), dtype=torch.float32)
        parts += [mids, -mids]
    return torch.sort(torch.cat(parts)).values


DYNAMIC_CODEBOOK = _dynamic_codebook()

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCKSIZE = 256  # hard-coded in bitsandbytes whatever the first-level blocksize
_MIN_SCALE = 1e-38  # bitsandbytes' clamp: an all-zero block then quantizes to code 7 (0.0)
# Elements per step: the temporaries of one step stay small (16 MiB per fp32 temporary). Note:
# smaller chunks are ~20 % faster on an idle machine but every op is a hand-off between torch's
# threads, and on a loaded machine each hand-off can cost a scheduler slice (measured here: 2^18
# made 4096^2 quantization 6x slower with 2 threads under load); 4 steps for 4096^2 is robust.
_CHUNK = 1 << 22


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight in NF4, laid out exactly as a bitsandbytes ``QuantState`` + packed tensor.

    Attributes:
        packed: uint8 ``((n + 1) // 2, 1)``, two codes per byte, element ``2j`` in the high nibble.
        absmax: fp32 ``(N_b,)`` block scales ``s``; with double quantization uint8 ``(N_b,)`` codes
            ``p`` into ``DYNAMIC_CODEBOOK``.
        shape, dtype: the original tensor's shape and dtype (dequantization returns these).
        blocksize: ``B``, elements per first-level block.
        nested_absmax: DQ only: fp32 ``(ceil(N_b / 256),)`` superblock scales ``t``.
        offset: DQ only: 0-dim fp32 ``mu``, the mean of ``s``.
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: Tensor | None = None
    offset: Tensor | None = None

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)
        n = math.prod(self.shape)
        n_blocks = -(-n // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"NF4Tensor.packed must be uint8 with {(n + 1) // 2} elements for shape "
                f"{tuple(self.shape)}, got {self.packed.dtype} with {self.packed.numel()}"
            )
        if (self.nested_absmax is None) != (self.offset is None):
            raise ValueError("NF4Tensor: nested_absmax and offset must be both set or both None")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != n_blocks:
            raise ValueError(
                f"NF4Tensor.absmax must be {want} with {n_blocks} elements (shape "
                f"{tuple(self.shape)}, blocksize {self.blocksize}), got {self.absmax.dtype} "
                f"with {self.absmax.numel()}"
            )
        if self.nested_absmax is not None:
            n_super = -(-n_blocks // _NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != n_super:
                raise ValueError(
                    f"NF4Tensor.nested_absmax must be float32 with {n_super} elements, got "
                    f"{self.nested_absmax.dtype} with {self.nested_absmax.numel()}"
                )

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes a bitsandbytes checkpoint holds for this weight: packed codes, scales, the
        16-value ``quant_map``; with DQ also ``nested_absmax``, the 256-value ``nested_quant_map``
        and ``mu``."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + 16 * 4
        if self.nested_absmax is not None:
            total += self.nested_absmax.numel() * 4 + 256 * 4 + 4
        return total

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; choose one of {BLOCKSIZES}")


@cache
def _nf4_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Lookup tables for nearest-code rounding without a binary search.

    ``torch.bucketize`` on the 15 midpoints is exact but slow on CPU. Instead, bucket ``u`` by
    ``j = round(256 u) + 256`` (read from the float bits of ``u + 49152``, whose spacing is 1/256)
    and finish with one compare: ``q = LO[j] + (u > TH[j])``, where ``LO[j]`` counts midpoints
    below bucket j and ``TH[j]`` is the one midpoint inside it (+inf if none). That equals
    ``#{k : m_k < u}`` (ties to the lower code) whenever u lies in its bucket (edges included)
    and no bucket (width 1/256) holds two midpoints: the closest two are 0.08 apart. The rounding
    of ``u + 49152`` is exact to the bucket, so every u is in its bucket.
    Also returns the 256-row pair table for dequantization: ``PAIR[byte] = (c[hi], c[lo])``.
    """
    code = NF4_CODEBOOK
    mids = (code[:-1] + code[1:]) / 2
    edges = (torch.arange(-256, 258, dtype=torch.float64) - 0.5) / 256  # bucket j: [e_j, e_j+1]
    lo = torch.searchsorted(mids.double(), edges[:-1], side="left")  # #{k : m_k < e_j}
    th = torch.full((513,), math.inf, dtype=torch.float32)
    for m in mids.tolist():
        for j in ((edges[:-1] <= m) & (m <= edges[1:])).nonzero().flatten().tolist():
            if not math.isinf(float(th[j])):
                raise RuntimeError("NF4 rounding table: two midpoints share a bucket")
            th[j] = m
    return lo.to(torch.uint8).to(device), th.to(device), _pair_table(device)


@cache
def _pair_table(device: torch.device) -> Tensor:
    """``PAIR[byte] = (c[hi], c[lo])`` (256, 2) fp32: the dequantization table. Tensor ops only,
    so a compiled graph builds it (or folds it) without a break; quantization's tables are not
    needed to dequantize."""
    code = NF4_CODEBOOK
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().to(device)


_MAGIC = 49152.0  # 1.5 * 2^15: floats in [2^15, 2^16) are spaced exactly 1/256 apart
_MAGIC_BITS = 0x47400000  # bit pattern of _MAGIC


def _nf4_codes(u: Tensor, out: Tensor, scratch: tuple[Tensor, Tensor, Tensor]) -> None:
    """Write the nearest NF4 code of each scaled value ``u`` (fp32, 1-D) into uint8 ``out``."""
    lo_t, th_t, _ = _nf4_tables(u.device)
    m = u.numel()
    j = torch.add(u, _MAGIC, out=scratch[0][:m]).view(torch.int32)
    j.sub_(_MAGIC_BITS - 256)  # (u + 49152) bits - 49152 bits = round(256 u); shift to [0, 512]
    torch.index_select(lo_t, 0, j, out=out)
    th = torch.index_select(th_t, 0, j, out=scratch[1][:m])  # the one midpoint that can flip u
    out.add_(torch.gt(u, th, out=scratch[2][:m]))


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"nf4_quantize expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"nf4_quantize: weight dtype {w.dtype} is not supported; NF4 quantizes float32, "
            "bfloat16 or float16 tensors (cast with .float() first)"
        )
    if w.numel() == 0:
        raise ValueError(f"nf4_quantize: weight of shape {tuple(w.shape)} is empty")


def nf4_quantize(
    w: Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    nested_rounding: str = "bnb_cpu",
) -> NF4Tensor:
    """Quantize ``w`` (fp32/bf16/fp16, any shape) to blockwise NF4, optionally double-quantized.

    ``s_b = max|w_i|`` per block of ``blocksize`` elements, ``q_i = nearest code of w_i / s_b``.
    With ``double_quant`` the scales are stored as 8-bit codes (see the module docstring).

    Args:
        w: the weight. It is not modified; gradients are not tracked.
        blocksize: one of ``BLOCKSIZES``; QLoRA uses 64.
        double_quant: quantize the block scales too (QLoRA's DQ; bitsandbytes'
            ``compress_statistics``).
        nested_rounding: ``"bnb_cpu"`` (default) reproduces bitsandbytes' CPU 8-bit rounding, a
            65,536-entry lookup table; ``"nearest"`` rounds exactly, as bitsandbytes' CUDA kernel
            does. The two disagree on ~0.2 % of the scale codes; dequantization is the same rule.

    Raises:
        ValueError: unsupported dtype or blocksize, empty tensor, NaN or Inf in ``w``.
    """
    _check_weight(w)
    check_blocksize(blocksize)
    if nested_rounding not in ("bnb_cpu", "nearest"):
        raise ValueError(
            f"nested_rounding={nested_rounding!r} is not supported; use 'bnb_cpu' or 'nearest'"
        )
    with torch.no_grad():
        flat = w.detach().reshape(-1).float()  # exact for bf16/fp16
        n = flat.numel()
        n_full = n // blocksize
        full = n_full * blocksize
        rem = n - full
        x = flat[:full].view(n_full, blocksize)  # (N_full, B)

        absmax = torch.empty(n_full + (rem > 0), dtype=torch.float32, device=w.device)
        lo, hi = torch.aminmax(x, dim=1)  # one pass instead of abs() + amax()
        torch.maximum(hi, lo.neg_(), out=absmax[:n_full])
        absmax[:n_full].add_(0.0)  # -0.0 -> +0.0, as abs().amax() gives for an all-zero block
        if rem:
            # Note: bitsandbytes stores the clamped scale for the partial block (1e-38 when it is
            # all zeros) but the unclamped one (0.0) for full blocks; both dequantize to zeros.
            absmax[n_full] = flat[full:].abs().max().clamp(min=_MIN_SCALE)
        bad = ~torch.isfinite(absmax)  # NaN and Inf propagate into their block's absmax
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(
                f"nf4_quantize: weight of shape {tuple(w.shape)} contains NaN or Inf "
                f"(first in flat elements {b * blocksize}..{min(n, (b + 1) * blocksize) - 1})"
            )
        inv = absmax[:n_full].clamp(min=_MIN_SCALE).reciprocal_()  # fl(1 / s_b)

        codes = torch.empty(n + (n & 1), dtype=torch.uint8, device=w.device)
        rows = max(1, _CHUNK // blocksize)
        m = min(n_full, rows) * blocksize
        u_s = torch.empty(max(m, rem + 1), dtype=torch.float32, device=w.device)
        scratch = (
            torch.empty_like(u_s),
            torch.empty_like(u_s),
            torch.empty_like(u_s, dtype=torch.bool),
        )
        for r0 in range(0, n_full, rows):
            r1 = min(n_full, r0 + rows)
            u = u_s[: (r1 - r0) * blocksize]
            torch.mul(x[r0:r1], inv[r0:r1, None], out=u.view(r1 - r0, blocksize))  # (rows, B)
            _nf4_codes(u, codes[r0 * blocksize : r1 * blocksize], scratch)
        if rem or n & 1:
            u = u_s[: rem + (n & 1)]
            torch.div(flat[full:], absmax[n_full:], out=u[:rem])
            u[rem:] = 0.0  # odd n: the pad nibble is the code of 0.0 (7)
            _nf4_codes(u, codes[full:], scratch)
        pairs = codes.view(-1, 2)  # (n_bytes, 2): element 2j in the high nibble
        packed = torch.bitwise_left_shift(pairs[:, 0], 4).bitwise_or_(pairs[:, 1])

        if not double_quant:
            return NF4Tensor(packed.view(-1, 1), absmax, w.shape, w.dtype, blocksize)
        qabs, nested, offset = _quantize_scales(absmax, nested_rounding)
        return NF4Tensor(packed.view(-1, 1), qabs, w.shape, w.dtype, blocksize, nested, offset)


@cache
def _dynamic_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """bitsandbytes-CPU's 8-bit rounding: LUT entry i stands for g_i = fl(-1 + fl(2i / 65535)) and
    holds #{k : m_k < g_i} for the fp32 midpoints m_k of the dynamic map."""
    mids = (DYNAMIC_CODEBOOK[:-1] + DYNAMIC_CODEBOOK[1:]) / 2
    g = torch.arange(65536, dtype=torch.float32).mul_(2.0).div_(65535.0).sub_(1.0)
    lut = torch.bucketize(g, mids).to(torch.uint8)
    return lut.to(device), mids.to(device)


def _quantize_scales(absmax: Tensor, rounding: str) -> tuple[Tensor, Tensor, Tensor]:
    """DQ: ``mu = mean(s)``, ``v = s - mu``, ``t_k = max|v|`` per 256, ``p = Q8(v * fl(1/t_k))``."""
    offset = absmax.mean()  # torch.mean, the same reduction bitsandbytes uses: last-ulp parity
    v = absmax - offset
    n = v.numel()
    n_super = -(-n // _NESTED_BLOCKSIZE)
    padded = torch.zeros(n_super * _NESTED_BLOCKSIZE, dtype=torch.float32, device=v.device)
    padded[:n] = v
    t = padded.view(n_super, _NESTED_BLOCKSIZE).abs().amax(dim=1)  # (n_super,)
    u = padded.view(n_super, _NESTED_BLOCKSIZE) * t.reciprocal()[:, None]  # (n_super, 256)
    # Note: t = 0 (all scales equal) or t < 2.9e-39 (1/t = inf) makes 0 * inf = NaN, which
    # bitsandbytes CPU codes as 0 (the lowest code); +-inf clamps to +-1 like any other value.
    u = torch.nan_to_num_(u, nan=-1.0, posinf=1.0, neginf=-1.0).clamp_(-1.0, 1.0)
    lut, mids = _dynamic_tables(v.device)
    if rounding == "bnb_cpu":
        # trunc(fl(fl(fl(u + 1) * 0.5) * 65535) + 0.5), each step an fp32 rounding as in the C++.
        codes = lut[u.add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5).to(torch.int64)]
    else:
        codes = torch.bucketize(u, mids).to(torch.uint8)
    return codes.view(-1)[:n].clone(), t, offset


def _block_scales(q: NF4Tensor) -> Tensor:
    """fp32 ``(N_b,)`` first-level scales; with DQ ``s^_b = fl(fl(d[p_b] * t_k) + mu)``."""
    if q.nested_absmax is None or q.offset is None:
        return q.absmax
    code = DYNAMIC_CODEBOOK.to(q.absmax.device)
    n = q.absmax.numel()
    n_super = q.nested_absmax.numel()
    d = torch.zeros(n_super * _NESTED_BLOCKSIZE, dtype=torch.float32, device=q.absmax.device)
    torch.index_select(code, 0, q.absmax.int(), out=d[:n])
    s = d.view(n_super, _NESTED_BLOCKSIZE).mul_(q.nested_absmax[:, None]).view(-1)[:n]
    return s.add_(q.offset)


def nf4_dequantize(q: NF4Tensor, *, compile: bool = False) -> Tensor:
    """``w^_i = fl(c[q_i] * s_b)`` in fp32, cast to ``q.dtype`` and reshaped to ``q.shape``.

    Pure PyTorch: one 256-row table maps each byte to its two code values, so unpacking is a single
    ``index_select``; the work runs in cache-sized chunks written straight into the output.
    ``compile=True`` runs the same arithmetic as one compiled kernel instead (opt-in:
    the first call per shape compiles for seconds; results are bit-identical).
    """
    scales = _block_scales(q)
    pair = _pair_table(q.packed.device)
    B = q.blocksize
    n = q.numel()
    n_full = n // B
    full = n_full * B
    packed = q.packed.view(-1)
    # Note: inside a compiled graph the chunked loop (dtype views, out= writes) would only get in
    # the compiler's way: the plain full-block form is what it fuses.
    compiling = torch.compiler.is_compiling()
    if compile or compiling:
        dequant = _dequantize_full_blocks if compiling else _compiled_dequantize()
        body = dequant(packed[: full // 2], scales[:n_full], pair, q.dtype)
        if full == n:
            return body.view(q.shape)
        out = torch.empty(n, dtype=q.dtype, device=q.packed.device)
        out[:full] = body
    else:
        out = torch.empty(n, dtype=q.dtype, device=q.packed.device)
        _dequantize_chunked(packed, scales, pair, out, n_full, B)
    if full < n:
        tail = pair[packed[full // 2 :].int()].view(-1)[: n - full]  # (rem,), drops a pad nibble
        out[full:] = tail * scales[n_full]
    return out.view(q.shape)


def _dequantize_chunked(
    packed: Tensor, scales: Tensor, pair: Tensor, out: Tensor, n_full: int, B: int
) -> None:
    # Note: each (c[hi], c[lo]) fp32 pair is gathered as one 8-byte float64, a 1-D index_select
    # that is ~2.5x faster than gathering (256, 2) rows. Only bytes move (no arithmetic touches
    # the float64s), so every bit of the fp32 pair survives.
    pair64 = pair.view(torch.float64).view(-1)  # (256,)
    rows = max(1, _CHUNK // B)
    direct = out.dtype == torch.float32
    m = min(n_full, rows) * B
    idx_s = torch.empty(m // 2, dtype=torch.int32, device=out.device)
    val_s = None if direct else torch.empty(m, dtype=torch.float32, device=out.device)
    for r0 in range(0, n_full, rows):
        r1 = min(n_full, r0 + rows)
        e0, e1 = r0 * B, r1 * B
        idx = idx_s[: (e1 - e0) // 2]
        idx.copy_(packed[e0 // 2 : e1 // 2])
        vals = out[e0:e1] if val_s is None else val_s[: e1 - e0]
        torch.index_select(pair64, 0, idx, out=vals.view(torch.float64))  # 2 codes per byte
        vals.view(r1 - r0, B).mul_(scales[r0:r1, None])  # (rows, B) * (rows, 1)
        if val_s is not None:
            out[e0:e1].copy_(vals)  # fp32 -> bf16/fp16, round to nearest even


def _dequantize_full_blocks(
    packed: Tensor, scales: Tensor, pair: Tensor, dtype: torch.dtype
) -> Tensor:
    vals = pair[packed.int()]  # (bytes, 2) code values
    return (vals.view(scales.numel(), -1) * scales[:, None]).to(dtype).view(-1)  # (N_b, B)


@cache
def _compiled_dequantize() -> Callable[[Tensor, Tensor, Tensor, torch.dtype], Tensor]:
    return cast(
        Callable[[Tensor, Tensor, Tensor, torch.dtype], Tensor],
        torch.compile(_dequantize_full_blocks),
    )
