"""S2-Attn (LongLoRA) against an explicit (seq x seq) mask reference and a literal roll version."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftkit.attention import s2_attention, shift, unshift

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
REFERENCE_SETTINGS = settings(SETTINGS, max_examples=150)


def reference_mask(n_heads: int, n: int, group: int, causal: bool, wrap: bool) -> torch.Tensor:
    """(H, N, N) boolean: query i of head h may see key j; written from the spec's mask form."""
    half = group // 2
    idx = torch.arange(n)
    masks = []
    for h in range(n_heads):
        if h < n_heads // 2:
            order, grp = idx, idx // group
        elif wrap:
            order = (idx - half) % n  # position of token x after roll(-G/2)
            grp = order // group
        else:
            order, grp = idx, (idx + half) // group
        allowed = grp[:, None] == grp[None, :]
        if causal:
            allowed &= order[None, :] <= order[:, None]
        masks.append(allowed)
    return torch.stack(masks)


def reference_attention(q, k, v, mask, valid=None, scale=None):
    """Plain float64 softmax attention under an explicit (H, N, N) mask and a (B, N) key mask."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)  # (B, H, N, D)
    v = v.double().repeat_interleave(rep, dim=1)  # (B, H, N, D)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = mask[None]  # (1, H, N, N)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]  # (B, H, N, N)
    scores = (q.double() @ k.transpose(-1, -2)) * scale  # (B, H, N, N)
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows give NaN: zero them
    out = probs @ v  # (B, H, N, D)
    if valid is not None:
        out = out * valid[:, None, :, None]
    return out


def reference_s2(q, k, v, group, *, causal=True, wrap=False, attention_mask=None, scale=None):
    mask = reference_mask(q.shape[1], q.shape[2], group, causal, wrap)
    valid = None if attention_mask is None else attention_mask.bool()
    return reference_attention(q, k, v, mask, valid, scale)


def roll_s2(q, k, v, group):
    """The paper's two-line roll form, literally: roll, group, causal attention, roll back."""
    b, h, n, d = q.shape
    half = group // 2

    def roll_half(x, s):
        return torch.cat((x[:, : h // 2], x[:, h // 2 :].roll(s, dims=2)), dim=1)

    qkv = torch.stack([roll_half(t, -half) for t in (q, k, v)], dim=2)  # (B, H, 3, N, D)
    qkv = qkv.permute(0, 3, 2, 1, 4).reshape(b * n // group, group, 3, h, d)  # (B*N/G, G, 3, H, D)
    qg, kg, vg = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B*N/G, H, G, D) each
    scores = qg @ kg.transpose(-1, -2) / math.sqrt(d)  # (B*N/G, H, G, G)
    causal = torch.ones(group, group, dtype=torch.bool).tril()
    out = scores.masked_fill(~causal, -math.inf).softmax(-1) @ vg  # (B*N/G, H, G, D)
    out = out.transpose(1, 2).reshape(b, n, h, d).transpose(1, 2)  # (B, H, N, D)
    return roll_half(out, half)


@st.composite
def s2_cases(draw):
    heads = draw(st.sampled_from([2, 4, 6, 8]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(1, 40))
    group = 2 * draw(st.integers(1, 12))
    dim = draw(st.integers(1, 8))
    causal = draw(st.booleans())
    wrap = draw(st.booleans())
    padding = draw(st.sampled_from(["none", "left", "right"]))
    lengths = [draw(st.integers(0, n)) for _ in range(batch)]
    seed = draw(st.integers(0, 2**16))
    return heads, kv_heads, batch, n, group, dim, causal, wrap, padding, lengths, seed


def padding_mask(batch, n, lengths, side):
    pos = torch.arange(n)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b] = (pos >= n - length) if side == "left" else (pos < length)
    return mask


def qkv(batch, heads, kv_heads, n, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=dtype)
    return q, k, v


@REFERENCE_SETTINGS
@given(s2_cases())
def test_matches_explicit_mask_reference(case):
    heads, kv_heads, batch, n, group, dim, causal, wrap, padding, lengths, seed = case
    q, k, v = qkv(batch, heads, kv_heads, n, dim, seed)
    mask = None if padding == "none" else padding_mask(batch, n, lengths, padding)
    out = s2_attention(q, k, v, group, causal=causal, wrap=wrap, attention_mask=mask)
    ref = reference_s2(q, k, v, group, causal=causal, wrap=wrap, attention_mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_never_attended_and_never_nan(side, wrap, backend):
    q, k, v = qkv(3, 4, 2, 24, 8)
    mask = padding_mask(3, 24, [24, 13, 0], side)  # full row, half-padded row, all-padding row
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
        out = s2_attention(q, k, v, 8, wrap=wrap, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert (out * (1 - mask)[:, None, :, None] == 0).all()  # padded query rows are zeros
    torch.testing.assert_close(
        out.double(), reference_s2(q, k, v, 8, wrap=wrap, attention_mask=mask), atol=2e-5, rtol=1e-4
    )
    # Changing padded keys/values must not change any real token's output.
    pad = (mask == 0)[:, None, :, None]
    k2, v2 = k.masked_fill(pad, 1e4), v.masked_fill(pad, -1e4)
    torch.testing.assert_close(s2_attention(q, k2, v2, 8, wrap=wrap, attention_mask=mask), out)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_right_padding_equals_unpadded_prefix():
    q, k, v = qkv(1, 4, 4, 20, 4, seed=1)
    mask = padding_mask(1, 20, [13], "right")
    out = s2_attention(q, k, v, 6, attention_mask=mask)
    short = s2_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], 6)
    torch.testing.assert_close(out[:, :, :13], short)


@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (8, 2), (8, 1), (6, 3), (6, 1), (4, 4)])
def test_grouped_kv_heads_equal_repeated_kv(heads, kv_heads):
    q, k, v = qkv(2, heads, kv_heads, 32, 4, seed=2)
    rep = heads // kv_heads
    kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # HF repeat_kv
    for wrap in (False, True):
        out = s2_attention(q, k, v, 8, wrap=wrap)
        torch.testing.assert_close(out, s2_attention(q, kr, vr, 8, wrap=wrap))
        torch.testing.assert_close(
            out.double(), reference_s2(q, kr, vr, 8, wrap=wrap), atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("n,group", [(10, 4), (7, 4), (13, 6), (3, 8), (5, 2), (1, 2)])
@pytest.mark.parametrize("wrap", [False, True])
def test_length_not_a_multiple_of_group(n, group, wrap):
    q, k, v = qkv(2, 4, 2, n, 4, seed=3)
    out = s2_attention(q, k, v, group, wrap=wrap)
    torch.testing.assert_close(
        out.double(), reference_s2(q, k, v, group, wrap=wrap), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("n,group", [(32, 8), (64, 16), (48, 48), (24, 2)])
def test_wrap_equals_literal_roll_version(n, group):
    q, k, v = qkv(2, 4, 4, n, 8, seed=4)
    torch.testing.assert_close(s2_attention(q, k, v, group, wrap=True), roll_s2(q, k, v, group))


def test_wrap_leaks_future_and_no_wrap_does_not():
    n, group = 32, 8
    causal_order = torch.ones(n, n, dtype=torch.bool).tril()
    leak = reference_mask(4, n, group, causal=True, wrap=True) & ~causal_order
    assert int(leak.sum()) == 2 * (group // 2) ** 2  # (H/2)(G/2)^2 pairs see the future
    assert not (reference_mask(4, n, group, causal=True, wrap=False) & ~causal_order).any()
    # The implementation agrees: a future key moves a head token's output only with wrap=True.
    q, k, v = qkv(1, 4, 4, n, 4, seed=5)
    v2 = v.clone()
    v2[:, :, -1] += 100.0
    for wrap, moved in ((False, False), (True, True)):
        diff = s2_attention(q, k, v2, group, wrap=wrap) - s2_attention(q, k, v, group, wrap=wrap)
        assert bool(diff[:, :, : n - 1].abs().max() > 1e-3) is moved


@SETTINGS
@given(
    st.integers(1, 2),
    st.sampled_from([2, 4, 6]),
    st.integers(0, 20),
    st.integers(1, 10),
    st.booleans(),
)
def test_shift_unshift_round_trip(batch, heads, n, half, wrap):
    x = torch.randn(batch, heads, n, 3)
    y = shift(x, 2 * half, wrap=wrap)
    assert torch.equal(unshift(y, 2 * half, wrap=wrap), x)
    if wrap:
        assert torch.equal(y[:, heads // 2 :], x[:, heads // 2 :].roll(-half, dims=2))
    else:
        assert y.shape[2] == n + half
        assert torch.equal(y[:, heads // 2 :, half:], x[:, heads // 2 :])


@SETTINGS
@given(
    st.integers(2, 30),
    st.integers(1, 8),
    st.booleans(),
    st.booleans(),
)
def test_shift_aligns_every_head_to_plain_blocks(n, half, causal, wrap):
    """s2_attention = block attention on shift(q, k, v) (holes masked as keys), then unshift."""
    group = 2 * half
    q, k, v = qkv(1, 4, 4, n, 4, seed=n)
    qs, ks, vs = (shift(t, group, wrap=wrap) for t in (q, k, v))
    length = qs.shape[2]
    pos = torch.arange(length)
    blocks = pos[:, None] // group == pos[None, :] // group
    if causal:
        blocks &= pos[None, :] <= pos[:, None]
    slot = shift(torch.ones(1, 4, n, 1), group, wrap=wrap)[0, :, :, 0] > 0  # (H, L): not a hole
    mask = blocks[None] & slot[:, None, :]  # (H, L, L): holes are never keys
    out = reference_attention(qs, ks, vs, mask)
    expected = unshift(out, group, wrap=wrap)
    torch.testing.assert_close(
        s2_attention(q, k, v, group, causal=causal, wrap=wrap).double(),
        expected,
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("wrap", [False, True])
def test_gradients_flow(wrap):
    q, k, v = qkv(1, 4, 2, 12, 3, seed=6, dtype=torch.float64)
    mask = padding_mask(1, 12, [9], "left")
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: s2_attention(a, b, c, 4, wrap=wrap, attention_mask=mask), inputs
    )
    out = s2_attention(*inputs, 4, wrap=wrap)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in inputs)


def test_keeps_dtype_and_scale():
    q, k, v = qkv(1, 2, 2, 16, 8, seed=7)
    out = s2_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), s2_attention(q, k, v, 4), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(
        s2_attention(q, k, v, 4, scale=0.3).double(),
        reference_s2(q, k, v, 4, scale=0.3),
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_no_mask_is_built_without_padding(batch):
    """Without padding, autograd saves about what full SDPA saves: no (N x N) or per-group mask.

    Here a float mask over the groups would add 25 % and an (N x N) one 100 %; wrap=True also
    saves its rolled copy of the shifted half of q, k and v (+37.5 %).
    """
    n = 256
    q, k, v = (t.requires_grad_() for t in qkv(batch, 4, 4, n, 16))

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return sum(storages.values())

    full = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert saved_bytes(lambda: s2_attention(q, k, v, n // 4)) <= 1.1 * full
    assert saved_bytes(lambda: s2_attention(q, k, v, n // 4, wrap=True)) <= 1.5 * full


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group": 3}, "even"),
        ({"group": 0}, "even"),
        ({"heads": 3, "kv_heads": 3}, "even count"),
        ({"heads": 4, "kv_heads": 3}, "multiple"),
        ({"mask": torch.ones(2, 5)}, "padding mask"),
    ],
)
def test_bad_input_raises(kwargs, match):
    heads, kv_heads = kwargs.get("heads", 4), kwargs.get("kv_heads", 2)
    q, k, v = qkv(2, heads, kv_heads, 8, 4)
    with pytest.raises(ValueError, match=match):
        s2_attention(q, k, v, kwargs.get("group", 4), attention_mask=kwargs.get("mask"))
