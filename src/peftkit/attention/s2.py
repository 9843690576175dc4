"""S2-Attn, the shifted sparse attention of LongLoRA (Chen et al., https://arxiv.org/abs/2309.12307).

Training-time attention for long contexts: tokens attend only inside groups of ``G`` consecutive
tokens, and half of the heads use groups shifted by ``G/2`` so that information crosses group
borders. Inference uses ordinary full attention (the official code does; the paper reports that
testing with the S2 pattern is worse), so nothing here is meant for decoding with a KV cache.

For a query token ``i`` and a key token ``j`` of query head ``h`` (``H`` heads, ``N`` tokens)::

    out_i = sum_j softmax_j(scale * q_i . k_j + M_h(i, j)) v_j,   M_h(i, j) = 0 if allowed else -inf
    allowed  iff  grp_h(i) == grp_h(j)  and  ord_h(j) <= ord_h(i) (if causal)  and  j is not padding

    h <  H/2:             grp(x) = floor(x / G),                  ord(x) = x
    h >= H/2, wrap=False: grp(x) = floor((x + G/2) / G),          ord(x) = x
    h >= H/2, wrap=True:  grp(x) = floor(p(x) / G), ord(x) = p(x),  p(x) = (x - G/2) mod N

``wrap=False`` (the default, and what the official FlashAttention path computes through
``cu_seqlens``) gives the shifted heads the groups ``[0, G/2), [G/2, 3G/2), ...``: the first G/2
tokens form a short group of their own, and the last group holds whatever is left (G/2 tokens when
``N`` is a multiple of ``G``). No token sees a later one. ``wrap=True`` is the paper's roll form
(roll the shifted heads by -G/2, group, attend, roll back): its last shifted group holds the tail
tokens followed by the first G/2 tokens, which then attend to the tail, i.e. to their future.

``N`` need not be a multiple of ``G``: any group that runs past the end is simply shorter (the
official code raises instead; for ``N % G == 0`` both agree exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["s2_attention", "shift", "unshift"]


def _half_group(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2 or group_size % 2:
        # Note: the official non-flash code shifts by Python's -G // 2 (= -(G + 1) / 2 for odd G)
        # and back by G // 2, misaligning odd G by one token; an even G leaves no such choice.
        raise ValueError(f"group_size must be an even int >= 2, got {group_size}; use e.g. N // 4")
    return group_size // 2


def _split_heads(x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got {tuple(x.shape)}")
    heads = x.shape[1]
    if heads % 2:
        raise ValueError(
            f"{name} has {heads} heads; S2-Attn splits heads in two halves: use an even count"
        )
    x1, x2 = torch.split(x, heads // 2, dim=1)  # (B, H/2, N, D) each
    return x1, x2


def shift(x: Tensor, group_size: int, *, wrap: bool = False) -> Tensor:
    """Move the second half of the heads by G/2 so that every head's groups are aligned blocks.

    ``x`` is (B, H, N, D). In the result, every head attends within the blocks ``[kG, (k+1)G)`` of
    its own sequence axis (the last block may be shorter):

    - ``wrap=True``: heads ``[H/2, H)`` are rolled by ``-G/2`` (position p holds token
      ``(p + G/2) mod N``); the shape is unchanged.
    - ``wrap=False``: the result is (B, H, N + G/2, D); heads ``[0, H/2)`` are followed by G/2
      zero slots and heads ``[H/2, H)`` are preceded by G/2 zero slots (token t sits at t + G/2).
      The zero slots are holes, not tokens: attention over the result must mask them as keys.

    ``unshift(shift(x, G, wrap=w), G, wrap=w)`` returns ``x`` exactly.
    """
    half = _half_group(group_size)
    x1, x2 = _split_heads(x, "x")  # (B, H/2, N, D) each
    if wrap:
        x2 = torch.roll(x2, shifts=-half, dims=2)  # (B, H/2, N, D)
    else:
        x1 = F.pad(x1, (0, 0, 0, half))  # (B, H/2, N + G/2, D)
        x2 = F.pad(x2, (0, 0, half, 0))  # (B, H/2, N + G/2, D)
    return torch.cat((x1, x2), dim=1)  # (B, H, N or N + G/2, D)


def unshift(y: Tensor, group_size: int, *, wrap: bool = False) -> Tensor:
    """Inverse of :func:`shift` with the same ``group_size`` and ``wrap``."""
    half = _half_group(group_size)
    y1, y2 = _split_heads(y, "y")  # (B, H/2, L, D) each
    if wrap:
        y2 = torch.roll(y2, shifts=half, dims=2)  # (B, H/2, N, D)
    else:
        if y.shape[2] < half:
            raise ValueError(
                f"y has {y.shape[2]} positions, fewer than the G/2 = {half} slots shift() adds; "
                "pass the output of shift(x, group_size, wrap=False)"
            )
        n = y.shape[2] - half
        y1, y2 = y1[:, :, :n], y2[:, :, half:]  # (B, H/2, N, D) each
    return torch.cat((y1, y2), dim=1)  # (B, H, N, D)


def _segments(n: int, group_size: int, lead: int) -> list[tuple[int, int, int]]:
    """Cover ``[0, n)`` with ``(start, size, count)`` runs: short lead group, full groups, tail."""
    runs = []
    lead = min(lead, n)
    if lead:
        runs.append((0, lead, 1))
    full = (n - lead) // group_size
    if full:
        runs.append((lead, group_size, full))
    tail = n - lead - full * group_size
    if tail:
        runs.append((n - tail, tail, 1))
    return runs


def _to_groups(x: Tensor, count: int) -> Tensor:
    batch, size = x.shape[0], x.shape[2] // count
    g = x.view(batch, x.shape[1], count, size, x.shape[3]).transpose(1, 2)  # (B, count, h, size, D)
    g = g.reshape(batch * count, *g.shape[2:])  # (B*count, h, size, D): a view iff B == 1
    # Note: with B == 1 every group is a strided view of q/k/v (SDPA reads strides; nothing is
    # copied). With B > 1 the full groups are copies, so a lone short group is copied as well:
    # as a view, autograd would keep all of q/k/v alive to save a G/2-token slice of it.
    return g.contiguous() if batch > 1 else g


def _from_groups(o: Tensor, batch: int) -> Tensor:
    g = o.view(batch, -1, *o.shape[1:]).transpose(1, 2)  # (B, h, count, size, D)
    return g.flatten(2, 3)  # (B, h, count*size, D)


def _group_mask(valid: Tensor, count: int, causal: bool) -> Tensor:
    size = valid.shape[1] // count
    allowed = valid.reshape(-1, 1, 1, size)  # (B*count, 1, 1, size): key is a real token
    eye = torch.eye(size, dtype=torch.bool, device=valid.device)  # (size, size)
    if causal:
        allowed = allowed & torch.ones_like(eye).tril()  # (B*count, 1, size, size)
    # Note: a padding query may have no real key in its group; letting every query see itself
    # keeps every softmax row non-empty, so no SDPA backend can return NaN for it (torch's CPU
    # kernels give zeros anyway; not every backend does). Padded rows are zeroed afterwards.
    # Note: SDPA turns this mask into a float one and saves it: padding costs O(N*G) extra
    # activations per batch row (4 bytes per score), which is why unpadded input passes None.
    return allowed | eye  # (B*count, 1, size, size)


def _grouped(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Tensor | None,
    group_size: int,
    lead: int,
    causal: bool,
    scale: float | None,
) -> Tensor:
    """Attention within the groups ``[0, lead), [lead, lead + G), ...`` of one head half."""
    batch = q.shape[0]
    runs = _segments(q.shape[2], group_size, lead)
    lengths = [size * count for _, size, count in runs]
    # Note: split, not slicing: the backward of a split is one cat, while each slice's backward
    # writes its gradient into a fresh zero tensor of the full size.
    q_runs, k_runs, v_runs = (torch.split(t, lengths, dim=2) for t in (q, k, v))
    outs = []
    for (start, size, count), qs, ks, vs in zip(runs, q_runs, k_runs, v_runs, strict=True):
        qg = _to_groups(qs, count)  # (B*count, h, size, D)
        kg = _to_groups(ks, count)  # (B*count, hk, size, D)
        vg = _to_groups(vs, count)  # (B*count, hk, size, D)
        stop = start + size * count
        mask = None if valid is None else _group_mask(valid[:, start:stop], count, causal)
        og = F.scaled_dot_product_attention(
            qg,
            kg,
            vg,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=kg.shape[1] != qg.shape[1],
        )  # (B*count, h, size, D)
        outs.append(_from_groups(og, batch))  # (B, h, count*size, D)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (B, h, N, D)


def _padding_mask(attention_mask: Tensor | None, batch: int, n: int) -> Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, n):
        raise ValueError(
            f"attention_mask must be a (batch, seq) = ({batch}, {n}) 0/1 padding mask, got "
            f"{tuple(attention_mask.shape)}; pass the tokenizer's attention_mask, not a 4-D mask"
        )
    valid = attention_mask != 0  # (B, N)
    # Note: an all-ones mask is dropped so unpadded batches keep the mask-free fused kernel path.
    return None if bool(valid.all()) else valid


def s2_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_size: int,
    *,
    causal: bool = True,
    wrap: bool = False,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Shifted sparse attention (S2-Attn) of LongLoRA over one sequence.

    Args:
        q: (B, H, N, D) queries, H even.
        k, v: (B, Hk, N, D) keys and values, ``H % Hk == 0``. Query head h uses KV head
            ``h // (H / Hk)`` (Hugging Face's ``repeat_kv`` layout), and the group pattern is the
            query head's: the official code shifts after ``repeat_kv``. With Hk even, KV heads
            ``[0, Hk/2)`` serve exactly the unshifted query half and are used as they are (SDPA's
            ``enable_gqa``); with Hk odd, the middle KV head serves both halves, so K/V are
            repeated to H heads first.
        group_size: G, even. Not required to divide N: groups that run past the end are shorter.
        causal: causal order inside each group.
        wrap: False for the leak-free groups of the module docstring; True for the paper's roll
            form (exactly the official non-flash code when ``N % G == 0``).
        attention_mask: optional (B, N) 0/1 padding mask, left or right padding. Padded keys are
            never attended; padded query rows come out as zeros. Group boundaries stay at absolute
            positions (padding does not move them), so a right-padded row gives its real tokens the
            same output as the unpadded row.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        (B, H, N, D), q's dtype. Equation, group definitions and the wrap leak: module docstring.
    """
    half = _half_group(group_size)
    q1, q2 = _split_heads(q, "q")  # (B, H/2, N, D) each
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must be (B, Hk, N, D) of one shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, n, dim):
        raise ValueError(
            f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, seq or head_dim; "
            "S2-Attn is self-attention over one sequence (use full attention when decoding)"
        )
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of k/v's {kv_heads} heads")
    if kv_heads % 2:
        rep = heads // kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, N, D)
    k1, k2 = torch.split(k, k.shape[1] // 2, dim=1)  # (B, Hk/2, N, D) each
    v1, v2 = torch.split(v, v.shape[1] // 2, dim=1)  # (B, Hk/2, N, D) each
    valid = _padding_mask(attention_mask, batch, n)  # (B, N) or None

    out1 = _grouped(q1, k1, v1, valid, group_size, 0, causal, scale)  # (B, H/2, N, D)
    if wrap:
        # Note: the literal roll copies the shifted half of q, k, v (autograd saves the copies,
        # +37.5 % saved activations over wrap=False). Only the wrapped group needs a copy, but
        # the roll keeps the compatibility path short and exactly the paper's two lines.
        q2, k2, v2 = (torch.roll(t, shifts=-half, dims=2) for t in (q2, k2, v2))
        valid2 = None if valid is None else torch.roll(valid, shifts=-half, dims=1)  # (B, N)
        out2 = _grouped(q2, k2, v2, valid2, group_size, 0, causal, scale)  # (B, H/2, N, D)
        out2 = torch.roll(out2, shifts=half, dims=2)  # (B, H/2, N, D)
    else:
        out2 = _grouped(q2, k2, v2, valid, group_size, half, causal, scale)  # (B, H/2, N, D)
    out = torch.cat((out1, out2), dim=1)  # (B, H, N, D)
    if valid is not None:
        out = out.masked_fill(~valid[:, None, :, None], 0.0)  # (B, H, N, D)
    return out
