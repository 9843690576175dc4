"""NF4 storage: bit-exactness with bitsandbytes (oracle when installed, golden hashes always),
an independent reference of the definition, storage cost, NF4Linear, quantize_ and checkpoints."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peftkit.quant import (
    BLOCKSIZES,
    DYNAMIC_CODEBOOK,
    FP4_CODEBOOK,
    NF4_CODEBOOK,
    NF4Linear,
    NF4Tensor,
    nf4_dequantize,
    nf4_linear_from_bnb_state,
    nf4_linear_to_bnb_state,
    nf4_quantize,
    quantize_,
)
from peftkit.quant.nf4 import _nf4_codes


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != 0.0 and NaN patterns count)."""
    return a.dtype == b.dtype and a.shape == b.shape and sha(a) == sha(b)


# ---------------------------------------------------------------- an independent reference
MIDS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2


def ref_quantize(w: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, written plainly: packed bytes and fp32 absmax (bucketize on midpoints)."""
    x = w.reshape(-1).float()
    n = x.numel()
    absmax, codes = [], []
    for i in range(0, n, B):
        blk = x[i : i + B]
        s = blk.abs().max()
        if i + B <= n:  # full block: multiply by the reciprocal; partial: divide, clamp stored
            u = blk * (1.0 / s.clamp(min=1e-38))
        else:
            s = s.clamp(min=1e-38)
            u = blk / s
        absmax.append(s)
        codes.append(torch.bucketize(u.clamp(-1, 1), MIDS))
    q = torch.cat(codes + [torch.tensor([7])] * (n % 2)).to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2]).view(-1, 1), torch.stack(absmax)


def ref_dequantize(q: NF4Tensor) -> torch.Tensor:
    p = q.packed.view(-1).long()
    codes = torch.stack([p >> 4, p & 15], 1).view(-1)[: q.numel()]
    if q.nested_absmax is None:
        s = q.absmax
    else:
        t = q.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
        s = DYNAMIC_CODEBOOK[q.absmax.long()] * t + q.offset
    vals = NF4_CODEBOOK[codes] * s.repeat_interleave(q.blocksize)[: q.numel()]
    return vals.to(q.dtype).view(q.shape)


# ---------------------------------------------------------------- constants
def test_codebooks():
    assert sha(NF4_CODEBOOK)[:16] == "8501941daa1b8a90"
    assert sha(DYNAMIC_CODEBOOK)[:16] == "e732639a65f497b4"
    assert torch.all(NF4_CODEBOOK[1:] > NF4_CODEBOOK[:-1]) and NF4_CODEBOOK[7] == 0
    assert DYNAMIC_CODEBOOK[0] == -0.99296875 and DYNAMIC_CODEBOOK[127] == 0
    assert DYNAMIC_CODEBOOK[255] == 1.0
    assert torch.allclose(FP4_CODEBOOK[:8] * 12, torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3.0]))
    assert torch.equal(FP4_CODEBOOK[8:], -FP4_CODEBOOK[:8])


def test_codebooks_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert same_bits(NF4_CODEBOOK, F.get_4bit_type("nf4", device="cpu"))
    assert same_bits(FP4_CODEBOOK, F.get_4bit_type("fp4", device="cpu"))
    assert same_bits(DYNAMIC_CODEBOOK, F.create_dynamic_map(signed=True).float())


def test_rounding_table_equals_bucketize_near_every_edge():
    """The LUT + one-compare rounding against torch.bucketize (ties to the lower code), on every
    float within 300 ulps of each midpoint and bucket edge, and a dense sweep of [-1, 1]."""
    probes = [torch.linspace(-1.0000003, 1.0000003, 200_001)]
    for c in MIDS.tolist() + [(k - 256.5) / 256 for k in range(514)]:
        bits = torch.tensor([c], dtype=torch.float32).view(torch.int32)
        probes.append((torch.arange(-300, 301, dtype=torch.int32) + bits).view(torch.float32))
    u = torch.cat(probes)
    u = u[u.abs() <= 1.0000003]
    out = torch.empty(u.numel(), dtype=torch.uint8)
    _nf4_codes(
        u, out, (torch.empty_like(u), torch.empty_like(u), torch.empty(u.numel(), dtype=torch.bool))
    )
    assert torch.equal(out.long(), torch.bucketize(u, MIDS))
    on_mid = torch.isin(u, MIDS)
    assert on_mid.sum() == 15 and torch.equal(out[on_mid].long(), torch.arange(15))  # ties down


# ---------------------------------------------------------------- golden vectors (no bnb needed)
def test_golden_vector_spec():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    if sha(w)[:16] != "314e575b52e5779b":
        pytest.skip("torch.randn changed its stream; the golden input differs")
    q = nf4_quantize(w, 64, double_quant=False)
    assert q.packed.shape == (16384, 1) and q.packed[:6, 0].tolist() == [
        0x44,
        0x66,
        0xA9,
        0x61,
        0x83,
        0x88,
    ]
    assert sha(q.packed) == "ee092d518bcb0bd27eb0f2e3969e42c55f9e01c9db9e29ef3cbc15c06d18a4c2"
    assert sha(q.absmax) == "516744ebe7c49090ab4947cedbc21bd4b81e02a1d5c11c8ceaacbc3e19c61ed6"
    assert (
        sha(nf4_dequantize(q)) == "10177e3bc9ba89abeab131c66c32919b88c5d6a2bc620e23e09160b5b3fbb241"
    )
    q = nf4_quantize(w, 64)
    assert sha(q.packed) == "ee092d518bcb0bd27eb0f2e3969e42c55f9e01c9db9e29ef3cbc15c06d18a4c2"
    assert q.absmax[:4].tolist() == [217, 159, 44, 42]
    assert sha(q.absmax) == "5b80aad72d42e7699e1f8a541356f00dc3319991054e7ed5f96740ed12db176e"
    assert q.offset.item() == 2.5943291187286377
    assert q.nested_absmax.tolist() == [1.7489511966705322, 1.2851943969726562]
    assert (
        sha(nf4_dequantize(q)) == "5ae79f9660bf1e09972e2014f4e9b1458115737ae3c470d42402458b07ecd258"
    )
    q = nf4_quantize(w.bfloat16(), 64)
    assert sha(q.packed) == "797efef23cdb68a10bfd26b020cb8d60336b85f3a93e701def9c84c52d48404d"
    assert sha(q.absmax) == "b9e9583e054043505622d10fbea88e3a946b3d1c93fff3754373a873602367ac"
    assert (
        sha(nf4_dequantize(q)) == "9c769de54cfb4ca80aa6834e9afe0a704c393b4c7a6951b6eabe34a1ef67c82c"
    )


def _edge_inputs():
    torch.manual_seed(1)
    a = torch.randn(33, 65).to(torch.bfloat16)
    a[3:5] = 0  # all-zero blocks; 2145 elements: odd count, partial blocks crossing rows
    torch.manual_seed(2)
    b = (torch.randn(4103) * 0.02).half()  # one full 4096 block + a 7-element tail
    return a, b


GOLDEN_EDGE = {
    ("a", 32, True): [
        "514a6e7d42ccc1adee2c3341486ebb10209c6b766147ab01088feb5f6b58ce29",
        "11d6ebb33964c26d7daa9c59b65333748b68d671ad24ea11a8ca1cfe6d3b4e43",
        "3c43a2a5cb5f9c9a4f664d4983208f0072609be01ac5abd4feb9fb59a4c92ea4",
        "3c43a2a5cb5f9c9a4f664d4983208f0072609be01ac5abd4feb9fb59a4c92ea4",
        "482a8e6875e0044e55fe848992dffb6d96a4e74b2f63368cbf37be346cb85749",
    ],
    ("a", 128, False): [
        "3f2292eb0e315eda6623f623c54fd260b67ef091ee5fb4323db7243b89ce9d4a",
        "d956165024ccbda5e2b9169b6bb3c7685d1dc86e30bdfdd55df1b461d26d32bf",
        "44404ec64109e8e0c5a09e0d5d4cd4b05800188eeb5df6e2851a4fab3207f6d7",
    ],
    ("b", 4096, True): [
        "9b0e285594854009f650f331375c799ce2b8e0f8742b796f3dc2b7048d9915a5",
        "ea5dbf9596d187e9500f23e9a680109475341cf4e81f7e043f7d97152c10772f",
        "ac8cff2ae4d58c879eebd439df9c42054788fd173062f190e2f542cfa3c17870",
        "4dbfd3eb2fda8f9fb3963233be851fd535866e0eb3a3c99c1062ca030d08250d",
        "0f4a29c305ebdfe60235015d1682f8c42770b72e4a05fd0e20c73aef04683d74",
    ],
}


def _parts(q: NF4Tensor) -> list[torch.Tensor]:
    extra = [q.nested_absmax, q.offset] if q.double_quant else []
    return [q.packed, q.absmax, *extra, nf4_dequantize(q)]


@pytest.mark.parametrize("key", list(GOLDEN_EDGE))
def test_golden_edge_cases(key):
    a, b = _edge_inputs()
    w = {"a": a, "b": b}[key[0]]
    if sha(w) not in (
        "be83857bf02d46553bd83d15b4dfe0844cafe5fbd095679203196a2366860176",
        "f17f3f5aa2e31fe40d2e032a3588c98733b64577cf78f165902019fa1eba942a",
    ):
        pytest.skip("torch.randn changed its stream; the golden input differs")
    q = nf4_quantize(w, key[1], key[2])
    assert [sha(p) for p in _parts(q)] == GOLDEN_EDGE[key]


# ---------------------------------------------------------------- the bitsandbytes oracle
def _bnb_row_kernel_ok(shape: tuple[int, ...], B: int) -> bool:
    """bitsandbytes 0.50.2's AVX-512 CPU dequantize kernel (blocksize < 2048, even last dim)
    returns wrong values when a row is shorter than a block (e.g. (128, 256) at B=512: relative
    error 0.32 instead of 0.10); it disagrees with its own quantization there, so skip those."""
    last = shape[-1]
    return B >= 2048 or last % 2 == 1 or last >= B


@pytest.fixture
def no_dynamo():
    """bitsandbytes torch.compiles its fallback dequantize per shape: seconds each on 2 cores.
    Run it eagerly (same operations) to keep the suite fast. torch's config module is not a plain
    module (pytest's monkeypatch deletes the entry on undo), so use its own scoped patch."""
    with torch._dynamo.config.patch(disable=True):
        yield


SHAPES = [(128, 256), (33, 65), (7,), (1, 3), (5, 5), (3, 1000), (64,), (4103,), (2, 8300)]


@pytest.mark.parametrize("B", BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_exact_with_bitsandbytes(B, dtype, no_dynamo):
    F = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(B)
    for shape in SHAPES:
        w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        if w.numel() > 300:
            w.view(-1)[100 : 100 + 2 * B] = 0  # zero blocks, and a zero partial block for 4103
        for dq in (False, True):
            p, state = F.quantize_4bit(w, blocksize=B, compress_statistics=dq, quant_type="nf4")
            q = nf4_quantize(w, B, dq)
            assert same_bits(q.packed, p), (shape, dq)
            assert same_bits(q.absmax, state.absmax), (shape, dq)
            if dq:
                assert same_bits(q.nested_absmax, state.state2.absmax), (shape, dq)
                assert same_bits(q.offset, state.offset), (shape, dq)
            d = nf4_dequantize(q)
            assert d.shape == w.shape and d.dtype == dtype
            assert same_bits(d, ref_dequantize(q))
            if _bnb_row_kernel_ok(shape, B) and w.numel() > 2:  # bnb transposes 2-element outputs
                assert same_bits(d, F.dequantize_4bit(p, state).reshape(shape)), (shape, dq)


def test_double_quant_rounding_matches_bitsandbytes_cpu_on_larger_tensors():
    F = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(0)
    for i, (shape, scale) in enumerate(
        [((512, 1024), 0.005), ((768, 640), 3.0), ((300, 777), 0.3)]
    ):
        w = torch.randn(shape, generator=gen) * scale
        w = w.bfloat16() if i == 1 else w
        _, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        q = nf4_quantize(w, 64)
        assert same_bits(q.absmax, state.absmax) and same_bits(q.nested_absmax, state.state2.absmax)


def _tiny_scale_weights() -> list[torch.Tensor]:
    """Scales whose DQ deviations t are denormal: 1/t overflows to inf, 0 * inf is NaN."""
    out = []
    for x, d in [(2e-38, 2e-39), (1e-38, 1e-39), (5e-39, 1e-40), (1.0, 1e-39)]:
        w = torch.zeros(3, 64)
        w[0, 5], w[1, 7], w[2, 9] = x, x + d, -(x - d)
        out.append(w)
    g = torch.Generator().manual_seed(3)
    for scale in (1e-38, 3e-39, 1e-40, 1e-45):
        w = torch.randn(64 * 300 + 3, generator=g) * scale
        w[torch.rand(w.numel(), generator=g) < 0.2] = 0
        out.append(w)
    return out


def test_denormal_scales_follow_bitsandbytes_cpu():
    w = _tiny_scale_weights()[0]  # v = s - mu = [0, +d, -d] with 1/d = inf
    q = nf4_quantize(w)
    assert q.absmax.tolist() == [0, 255, 0]  # NaN -> code 0, +inf -> 1 -> 255, -inf -> 0
    assert torch.isfinite(nf4_dequantize(q)).all()


def test_denormal_scales_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    for w in _tiny_scale_weights():
        for B in (32, 64):
            p, state = F.quantize_4bit(w, blocksize=B, compress_statistics=True, quant_type="nf4")
            q = nf4_quantize(w, B)
            assert same_bits(q.packed, p) and same_bits(q.absmax, state.absmax)
            assert same_bits(q.nested_absmax, state.state2.absmax)
            assert same_bits(nf4_dequantize(q), F.dequantize_4bit(p, state).reshape(w.shape))


def test_nearest_nested_rounding():
    w = torch.randn(256, 512)
    q = nf4_quantize(w, 64, nested_rounding="nearest")
    s = nf4_quantize(w, 64, double_quant=False).absmax
    v = s - s.mean()
    t = v.view(-1, 256).abs().amax(1)
    u = (v.view(-1, 256) * (1.0 / t)[:, None]).clamp(-1, 1).view(-1)
    mids = (DYNAMIC_CODEBOOK[:-1] + DYNAMIC_CODEBOOK[1:]) / 2
    assert torch.equal(q.absmax.long(), torch.bucketize(u, mids))
    assert torch.equal(q.packed, nf4_quantize(w, 64).packed)


# ---------------------------------------------------------------- properties of the definition
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700),
    B=st.sampled_from(BLOCKSIZES[:4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-45, 1e-40, 1e-38, 1e-30, 1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
    dq=st.booleans(),
)
def test_matches_reference_definition(n, B, dtype, scale, seed, dq):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * scale).to(dtype)
    w[torch.rand(n, generator=g) < 0.2] = 0
    q = nf4_quantize(w, B, dq)
    packed, absmax = ref_quantize(w, B)
    assert same_bits(q.packed, packed)
    if not dq:
        assert same_bits(q.absmax, absmax)
    assert same_bits(nf4_dequantize(q), ref_dequantize(q))
    assert q.packed.shape == ((n + 1) // 2, 1) and q.shape == w.shape and q.dtype == dtype
    if n % 2:
        assert q.packed[-1, 0].item() & 15 == 7  # the pad nibble is the code of 0.0


def test_zeros_and_exact_codebook_values():
    assert torch.equal(nf4_dequantize(nf4_quantize(torch.zeros(3, 70))), torch.zeros(3, 70))
    assert nf4_quantize(torch.zeros(3, 70)).packed.unique().tolist() == [0x77]
    w = torch.cat([NF4_CODEBOOK * 2.5] * 4)  # exact codebook multiples round-trip exactly
    q = nf4_quantize(w, 64, double_quant=False)
    assert torch.equal(nf4_dequantize(q), w)
    assert nf4_quantize(torch.tensor([-1.0, 1.0])).packed.tolist() == [[0x0F]]


def test_accuracy_of_nf4():
    w = torch.randn(512, 512)
    for dq in (False, True):
        err = (nf4_dequantize(nf4_quantize(w, 64, dq)) - w).norm() / w.norm()
        assert 0.08 < err < 0.1  # spec: relative Frobenius error 0.092 for N(0,1), B=64


def test_bits_per_parameter():
    """The paper's 4.127 (DQ) and 4.5 bits/param, on a 4096 x 4096 weight's storage. The storage
    of an (empty) NF4Linear is used so no 16.7M-element quantization runs; a small quantized
    layer checks that its buffers have exactly the constructor's layout."""
    for dq, bits in ((True, 4.127), (False, 4.5)):
        big = NF4Linear(4096, 4096, bias=False, double_quant=dq)
        assert round(big.nf4.bits_per_param, 3) == bits
        nbytes = sum(t.numel() * t.element_size() for t in big.state_dict().values())
        assert round(8 * nbytes / 4096**2, 3) == bits
        small = NF4Linear.from_linear(nn.Linear(300, 70, bias=False), double_quant=dq)
        empty = NF4Linear(300, 70, bias=False, double_quant=dq)
        for k, t in small.state_dict().items():
            ref = empty.state_dict()[k]
            assert (t.dtype, t.shape) == (ref.dtype, ref.shape), k
    w = torch.randn(512, 1024)
    assert nf4_quantize(w).nbytes == 512 * 1024 // 2 + 8192 + 32 * 4 + 16 * 4 + 256 * 4 + 4
    assert nf4_quantize(w, double_quant=False).nbytes == 512 * 1024 // 2 + 8192 * 4 + 16 * 4


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "w, match",
    [
        (torch.ones(4, 4, dtype=torch.int32), "int32"),
        (torch.ones(4, 4, dtype=torch.float64), "float64"),
        (torch.zeros(0, 4), "empty"),
        (torch.tensor([1.0, float("nan"), 2.0]), "NaN or Inf"),
        (torch.tensor([1.0, 2.0] * 40 + [float("-inf")]), "NaN or Inf"),
    ],
)
def test_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        nf4_quantize(w)


@pytest.mark.parametrize("B", [16, 100, 8192, True])
def test_bad_blocksize_names_value_and_choices(B):
    with pytest.raises(ValueError, match=rf"blocksize={B!r}.*32, 64, 128"):
        nf4_quantize(torch.randn(256), B)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(8, 8, blocksize=B)


def test_bad_nested_rounding_and_inconsistent_tensor():
    with pytest.raises(ValueError, match="nested_rounding"):
        nf4_quantize(torch.randn(64), nested_rounding="cuda")
    q = nf4_quantize(torch.randn(10, 64))
    with pytest.raises(ValueError, match="packed"):
        NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, 64, q.nested_absmax, q.offset)
    with pytest.raises(ValueError, match="absmax"):
        NF4Tensor(q.packed, q.absmax.float(), q.shape, q.dtype, 64, q.nested_absmax, q.offset)
    with pytest.raises(ValueError, match="both"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64, q.nested_absmax, None)


# ---------------------------------------------------------------- NF4Linear
def _pair(bias=True, dtype=torch.float32, compute_dtype=None, dq=True):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias).to(dtype)
    return lin, NF4Linear.from_linear(lin, double_quant=dq, compute_dtype=compute_dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dq", [True, False])
def test_linear_equals_dense_linear_with_dequantized_weight(bias, dq):
    lin, q = _pair(bias, dq=dq)
    dense = nn.Linear(256, 96, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
        if bias:
            dense.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 256, requires_grad=True)
    y, y_ref = q(x), dense(x)
    assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    assert q.dequantize().shape == (96, 256) and q.dequantize().dtype == torch.float32


def test_linear_bias_gradient_and_frozen_weight():
    _, q = _pair()
    assert not q.bias.requires_grad and not any(p.requires_grad for p in q.parameters())
    q.bias.requires_grad_(True)
    x = torch.randn(4, 256)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((96,), 4.0))


def test_linear_compute_dtype_and_input_dtype():
    lin, q = _pair(dtype=torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    x = torch.randn(2, 256)
    y = q(x)  # computed in bf16, returned in the input dtype
    assert y.dtype == torch.float32
    ref = nn.functional.linear(x.bfloat16(), q.dequantize(), lin.bias).float()
    assert torch.equal(y, ref)
    _, q32 = _pair(dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert q32.dequantize().dtype == torch.float32
    assert torch.equal(q32.dequantize(), q.dequantize().float())  # bf16 first, as bitsandbytes


def test_autograd_saves_only_packed_weight():
    _, q = _pair()
    x = torch.randn(8, 256, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 256]
    assert not big_float, [(t.dtype, tuple(t.shape)) for t in saved]
    assert any(t.dtype == torch.uint8 and t.numel() == 96 * 256 // 2 for t in saved)
    assert not any(t.numel() == x.numel() and t.is_floating_point() for t in saved)  # not x either
    y.sum().backward()
    assert x.grad is not None


def test_state_dict_round_trip_and_dtype_moves():
    _, q = _pair()
    w = q.dequantize()
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_absmax", "weight_nested_absmax", "weight_offset", "bias"}
    fresh = NF4Linear(256, 96)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), w)
    with pytest.raises(RuntimeError, match="weight_absmax"):
        NF4Linear(256, 96, blocksize=128).load_state_dict(sd)
    q.half()  # the fp32 scales must not be rounded to fp16
    assert q.weight_nested_absmax.dtype == torch.float32 and q.bias.dtype == torch.float16
    assert torch.equal(q.dequantize(), w)
    q.to(torch.bfloat16).to("cpu")
    assert torch.equal(q.dequantize(), w)
    no_dq = NF4Linear.from_linear(nn.Linear(64, 8), double_quant=False)
    assert set(no_dq.state_dict()) == {"weight", "weight_absmax", "bias"}
    assert "double_quant=False" in repr(no_dq) and "in_features=64" in repr(no_dq)


# ---------------------------------------------------------------- quantize_
class Tiny(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "up": nn.Linear(64, 128)})
        self.down = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.out = nn.Linear(64, 50, bias=False)
        if tie:
            self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, 64)
        h = self.down(torch.relu(self.block["up"](self.block["q_proj"](h))))  # (B, T, 64)
        return self.lm_head(h) + self.out(h)  # (B, T, 50)


def test_quantize_default_skips_head_and_tied_weights():
    torch.manual_seed(0)
    m = Tiny(tie=True)
    ids = torch.randint(0, 50, (2, 5))
    before = m(ids)
    assert quantize_(m) is m
    kinds = {n: type(mod).__name__ for n, mod in m.named_modules() if n}
    assert kinds["block.q_proj"] == kinds["block.up"] == kinds["down"] == "NF4Linear"
    assert kinds["lm_head"] == kinds["out"] == "Linear"
    assert m.out.weight is m.embed.weight
    after = m(ids)
    assert (after - before).abs().max() < 0.2 * before.abs().max()


def test_quantize_targets_and_errors():
    m = quantize_(Tiny(tie=False), target_modules=["q_proj", "lm_head"], double_quant=False)
    assert isinstance(m.block.q_proj, NF4Linear) and isinstance(m.lm_head, NF4Linear)
    assert isinstance(m.block.up, nn.Linear) and not m.lm_head.double_quant
    with pytest.raises(ValueError, match="nope"):
        quantize_(Tiny(tie=False), target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="embed"):
        quantize_(Tiny(tie=True), target_modules=["out"])
    with pytest.raises(TypeError, match="Embedding"):
        quantize_(Tiny(tie=False), target_modules=["embed"])
    with pytest.raises(TypeError, match="list"):
        quantize_(Tiny(tie=False), target_modules="q_proj")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()))
    m = quantize_(Tiny(tie=False), compute_dtype=torch.bfloat16, blocksize=32)
    assert m.down.compute_dtype == torch.bfloat16 and m.down.blocksize == 32
    m = quantize_(Tiny(tie=False), exclude_modules=["up", "absent"])
    assert type(m.block.up) is nn.Linear and isinstance(m.block.q_proj, NF4Linear)
    m = quantize_(Tiny(tie=False), target_modules=["down", "up"], exclude_modules=["block.up"])
    assert type(m.block.up) is nn.Linear and isinstance(m.down, NF4Linear)
    with pytest.raises(TypeError, match="exclude_modules"):
        quantize_(Tiny(tie=False), exclude_modules="up")


# ---------------------------------------------------------------- bitsandbytes checkpoints
def test_bnb_state_round_trip_without_bitsandbytes():
    _, q = _pair(dtype=torch.bfloat16)
    state = nf4_linear_to_bnb_state(q)
    meta = json.loads(bytes(state["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(meta) == [
        "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
        "nested_offset",
    ]  # fmt: skip
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [96, 256]
    back = nf4_linear_from_bnb_state(state)
    assert torch.equal(back.dequantize(), q.dequantize()) and torch.equal(back.bias, q.bias)


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_bitsandbytes_linear4bit_checkpoint(dq, dtype, no_dynamo):
    bnb = pytest.importorskip("bitsandbytes")
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    lin = nn.Linear(192, 80).to(dtype)
    layer = bnb.nn.Linear4bit(192, 80, compress_statistics=dq, quant_type="nf4")
    layer.load_state_dict(lin.state_dict())
    layer.weight.data = layer.weight.data.to(dtype)  # Linear4bit's params start fp32
    layer.bias.data = layer.bias.data.to(dtype)
    layer = layer.to("cpu")  # quantizes
    sd = layer.state_dict()
    ours = nf4_linear_from_bnb_state(sd)
    assert ours.weight_dtype == dtype and ours.double_quant == dq
    ref = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert same_bits(ours.dequantize(), ref)
    assert same_bits(ours.dequantize(), NF4Linear.from_linear(lin, double_quant=dq).dequantize())
    exported = nf4_linear_to_bnb_state(ours)
    assert set(exported) == set(sd)
    for k in sd:
        assert same_bits(exported[k], sd[k]), k
    no_bias = {k: v for k, v in sd.items() if k != "bias"}
    assert nf4_linear_from_bnb_state(no_bias, bias=sd["bias"]).bias is not None
    x = torch.randn(3, 192).to(dtype)
    with torch.no_grad():  # last: bitsandbytes may repack its CPU weight during inference
        assert same_bits(ours(x), layer(x))


def test_bnb_state_errors_name_the_tensor():
    _, q = _pair()
    state = nf4_linear_to_bnb_state(q)
    for key, bad in [
        ("weight", state["weight"][:-1]),
        ("weight.absmax", state["weight.absmax"][:-2]),
        ("weight.nested_absmax", torch.zeros(5)),
        ("bias", torch.zeros(95)),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            nf4_linear_from_bnb_state({**state, key: bad})
    with pytest.raises(ValueError, match="quant_map"):
        nf4_linear_from_bnb_state({**state, "weight.quant_map": FP4_CODEBOOK})
    with pytest.raises(ValueError, match="unexpected keys"):
        nf4_linear_from_bnb_state({**state, "weight.quant_state.bitsandbytes__fp4": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing key"):
        nf4_linear_from_bnb_state({k: v for k, v in state.items() if k != "weight.absmax"})


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_tiny_llama(tie):
    pytest.importorskip("transformers")
    from conftest import tiny_llama

    model = tiny_llama()
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    quantize_(model)
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).norm() < 0.25 * before.norm()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("shape, dtype", [((256, 512), torch.float32), ((33, 65), torch.bfloat16)])
def test_compiled_dequantize_is_bit_identical(shape, dtype):
    w = torch.randn(shape).to(dtype)
    for dq in (True, False):
        q = nf4_quantize(w, 64, dq)
        assert same_bits(nf4_dequantize(q, compile=True), nf4_dequantize(q))


def test_modules_a_model_keeps_in_fp32_stay_dense() -> None:
    """T5 keeps ``wo`` in fp32 (``_keep_in_fp32_modules``) and casts its feed-forward input to
    ``wo.weight.dtype``: quantizing it fed uint8 codes' dtype to the matmul (logits off by 5.5 on
    the tiny T5, against 0.55 for the rest quantized). ``quantize_`` now leaves such modules
    dense, as transformers' 4-bit loading does, and refuses them as named targets."""
    from conftest import tiny_t5

    model = tiny_t5()
    x = torch.randint(3, 125, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x, decoder_input_ids=x).logits
        quantize_(model)
        got = model(input_ids=x, decoder_input_ids=x).logits
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert type(ff.wo) is nn.Linear and isinstance(ff.wi, NF4Linear)
    assert (got - ref).abs().max() < 1.0  # NF4 error only; the uint8 cast gave 5.5
    with pytest.raises(ValueError, match=r"keeps 'encoder\.block\.0.*wo' in fp32"):
        quantize_(tiny_t5(), target_modules=["wo"])
    from peftkit.train import quantize_base  # QLoRA's storage with a module trained in full

    block = quantize_base(tiny_t5(), keep=["wi"]).decoder.block[1]  # used to raise on wo
    ff = block.layer[2].DenseReluDense
    assert type(ff.wi) is nn.Linear and type(ff.wo) is nn.Linear
    assert isinstance(block.layer[0].SelfAttention.q, NF4Linear)
