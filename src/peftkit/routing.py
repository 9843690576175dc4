"""Mixed-adapter batches: each row, or each token, of one batch through its own adapter.

    with peftkit.route(model, ["math", "code", None, "math"]):   # one name per row; None = base
        logits = model(input_ids).logits                         # or model.generate(...)

The one limitation of LoRA that its paper names is that inputs needing different A and B are hard
to batch. Here every adapted layer runs its base once on the whole batch and adds each row's own
update. For an update of LoRA form, ``x Aᵢᵀ B'ᵢᵀ`` (LoRA, rsLoRA, LoRA-FA, VeRA, AdaLoRA,
DyLoRA at its set rank, DoRA-Mao, LongLoRA's LoRA part, DoRA's direction), the factors of the
adapters in use are stacked (ranks zero-padded to the largest) and applied with two batched
matmuls, with no Python loop over adapters:

* positions grouped by adapter (a decoding step, and every per-token route ``(B, T)`` or packed
  ``(N,)``): the positions that use adapter i are gathered into group i, groups zero-padded to
  the largest, ``h = bmm(x_groups, Aᵀ)`` and ``y = bmm(h, B'ᵀ)`` on the stack as it is, then
  added back at their positions. Each position meets only its own adapter's factors;
* per row, for longer inputs (``(B,)`` routes, at least :data:`GATHER_MIN_POSITIONS`
  positions): each row's factors are gathered, ``h = bmm(x, A[row]ᵀ)``,
  ``y = baddbmm(out, h, B'[row]ᵀ)`` (the factor copies are small next to the activations).

Where a step reads every adapter's factors once (a decoding step whose rows all use different
adapters), time follows bytes: the step costs about as much as one adapter whose rank is the sum
of the ranks in use (``bench/w3_mixed.py``'s ``r128`` variant measures that floor).

DoRA's magnitude is a per-row factor g = m/‖W + sBA‖ applied to the base output and the update.
MoRA, embeddings and updates with per-adapter dropout in training run per adapter on the rows
that use it (a loop over the adapters in use: correct first). Delta-LoRA writes into W, which
every row shares, so it cannot be mixed: :func:`route` refuses it and names its exact export.

The route is decided once per forward: names become one index tensor, checked once, kept on the
model's state, where every layer reads it. ``generate`` repeats each row for beams and
``num_return_sequences``; the route reads that from the batch (rows repeated in groups) at the
first forward and expands the index in one place. An encoder–decoder's ``generate`` runs the
encoder once on the prompts (through ``get_encoder()``, which the route watches too) and then calls
the model with the repeated encoder output and ``decoder_input_ids`` alone: the route reads the
repetition from that encoder output. Such a model is routed per row only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import (
    EMBEDDING,
    AdaptedLayer,
    Adapter,
    ModelState,
    ModulesToSave,
    get_state,
    unwrap,
)

ROW, TOKEN, PACKED = "row", "token", "packed"


class Route:
    """One mixed batch's adapter index, in the model's adapter numbering (−1 = base), with the
    per-layer plans derived from it. Built by :func:`route`; layers read it, users don't."""

    def __init__(self, state: ModelState, ids: Tensor, kind: str, frozen: bool = False) -> None:
        self.state = state
        self.ids = ids  # (B,), (B, T) or (N,), long, on the CPU
        self.kind = kind
        self.factor: int | None = None  # rows repeated by generate (beams × return sequences)
        self._plans: dict[Any, Any] = {}  # token ids by layer input shape, shared by the layers
        self._layer_plans: dict[Any, Any] = {}  # read by routed_forward
        self._signature: tuple[Any, ...] | None = None
        self._device_ids: dict[torch.device, Tensor] = {}
        #: with ``frozen``, the layers whose cached stack was checked in this route (once each)
        self.frozen = frozen
        self.checked: set[int] = set()

    # -- the batch the model was called with ------------------------------------------------------
    def observe(self, batch: Tensor | None) -> None:
        """Check the model's input against the index (first forward) and learn ``generate``'s
        row expansion: ``k·B`` rows arriving as ``B`` groups of ``k`` identical rows."""
        if batch is None or self.kind == PACKED:
            return
        rows = int(batch.shape[0])
        if self.kind == TOKEN:
            if tuple(batch.shape[:2]) != tuple(self.ids.shape):
                raise ValueError(
                    f"route has per-token adapters of shape {tuple(self.ids.shape)}, but the "
                    f"model got input of shape {tuple(batch.shape[:2])}; per-token routing "
                    "needs the same (rows, tokens) (for generate, give one adapter per row)"
                )
            return
        n = int(self.ids.shape[0])
        if self.factor is not None and rows == n * self.factor:
            return
        if rows == n:
            if self.factor != 1:
                self.factor, self._signature = 1, None
            return
        if rows % n == 0 and rows > n:
            k = rows // n
            grouped = batch.reshape(n, k, *batch.shape[1:])
            if bool((grouped == grouped[:, :1]).all()):
                self.factor = k
                self._plans.clear()
                self._layer_plans.clear()
                self._signature = None
                return
        raise ValueError(
            f"route was given {n} adapter names/ids (one per row), but the batch has {rows} rows"
        )

    def _ids_on(self, device: torch.device) -> Tensor:
        t = self._device_ids.get(device)
        if t is None:
            t = self.ids.to(device)
            self._device_ids[device] = t
        return t

    def token_ids(self, lead: tuple[int, ...], device: torch.device) -> Tensor:
        """The model-numbered adapter of each of the ``prod(lead)`` positions of a layer input
        whose leading shape is ``lead`` (rows first), flattened."""
        key = ("ids", lead, device)
        got = self._plans.get(key)
        if got is not None:
            return got  # type: ignore[no-any-return]
        ids = self._ids_on(device)
        n = 1
        for d in lead:
            n *= d
        if self.kind == PACKED:
            if n != ids.numel():
                raise ValueError(
                    f"route has {ids.numel()} per-token adapters for a packed batch, but a layer "
                    f"got {n} positions (input of leading shape {lead})"
                )
            out = ids
        elif self.kind == TOKEN:
            if tuple(lead) == tuple(ids.shape):
                out = ids.reshape(-1)
            else:
                raise ValueError(
                    f"route has per-token adapters of shape {tuple(ids.shape)}, but a layer got "
                    f"input of leading shape {lead}"
                )
        else:
            rows = ids if not self.factor or self.factor == 1 else ids.repeat_interleave(
                self.factor
            )
            if not lead or lead[0] != rows.numel():
                raise ValueError(
                    f"route has {ids.numel()} adapter names/ids (one per row"
                    + (f", × {self.factor} rows each by generate" if (self.factor or 1) > 1 else "")
                    + f"), but a layer got input of leading shape {lead}"
                )
            out = rows.repeat_interleave(n // lead[0]) if n != lead[0] else rows
        self._plans[key] = out
        return out

    def per_row(self, lead: tuple[int, ...]) -> bool:
        return self.kind == ROW and len(lead) >= 1

    def forward(self, layer: AdaptedLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """What an :class:`~peftkit.core.AdaptedLayer` computes inside this route."""
        return routed_forward(layer, self, x, *args, **kwargs)

    def copies(self, m: ModulesToSave, *args: Any, **kwargs: Any) -> Any:
        """What a ``modules_to_save`` module computes inside this route."""
        return routed_copies(m, self, *args, **kwargs)

    def signature(self) -> tuple[Any, ...]:
        """What the per-layer plans depend on: the index's kind, content and row expansion."""
        if self._signature is None:
            self._signature = (
                self.kind, self.factor, tuple(self.ids.shape), self.ids.numpy().tobytes()
            )
        return self._signature


# -- per layer ------------------------------------------------------------------------------------
def _slot_map(layer: AdaptedLayer, state: ModelState, device: torch.device) -> Tensor:
    """``m[i + 1]`` = the position in ``layer.adapters`` of the model's adapter i (−1 if this
    layer lacks it); ``m[0] = −1`` for the base."""
    key = (state.generation, tuple(state.adapters), device)
    cached = layer.__dict__.get("_peftkit_slot_map")
    if cached is not None and cached[0] == key:
        return cached[1]  # type: ignore[no-any-return]
    local = list(layer.adapters)
    m = torch.tensor(
        [-1] + [local.index(n) if n in layer.adapters else -1 for n in state.adapters],
        dtype=torch.long,
        device=device,
    )
    layer.__dict__["_peftkit_slot_map"] = (key, m)
    return m


class _Part:
    """The stacked factors of the adapters of one rank group: ``members`` (their places in the
    layer's used adapters), ``at`` (k+1, in, r) = Aᵀ and ``bt`` (k+1, r, out) = B'ᵀ, ranks
    zero-padded to the group's largest, slot k zero (a position that uses none of them)."""

    def __init__(self, members: list[int], at: Tensor, bt: Tensor) -> None:
        self.members, self.at, self.bt = members, at, bt
        k = len(members)
        self.at_k, self.bt_k = at[:k], bt[:k]  # without the zero slot


class _Stack:
    """What a layer multiplies a mixed batch by: the adapters it uses in rank groups
    (:class:`_Part`; ranks within a factor :data:`RANK_SPREAD` of each other share one, so
    padding at most doubles a factor) and ``g`` (U+1, out), DoRA's per-adapter row scale (1 for
    the others and for the base), or None."""

    def __init__(self, parts: list[_Part], g: Tensor | None) -> None:
        self.parts, self.g = parts, g
        self.dtype = parts[0].at.dtype


#: Adapters whose ranks differ by at most this factor are stacked together (padded to the
#: largest); wider spreads get a stack each (one batched matmul pair per rank group, not per
#: adapter), so one rank-64 adapter does not pad seven rank-4 ones to 64.
RANK_SPREAD = 2


def _rank_groups(ranks: list[int]) -> list[list[int]]:
    """Indices into ``ranks`` grouped so that within a group the largest rank is at most
    :data:`RANK_SPREAD` times the smallest."""
    groups: list[list[int]] = []
    low = 0
    for j in sorted(range(len(ranks)), key=lambda j: ranks[j]):
        if groups and ranks[j] <= RANK_SPREAD * low:
            groups[-1].append(j)
        else:
            groups.append([j])
            low = ranks[j]
    return [sorted(g) for g in groups]


def _stack(
    layer: AdaptedLayer, ads: list[Adapter], used: list[int], route: Route
) -> _Stack | None:
    """The :class:`_Stack` of ``ads`` (the adapters at ``used``), or None when one of them has
    no LoRA form here. Cached while nothing can change it: no grad, the same tensor versions
    (checked at every forward, or once per route when the route is ``frozen``)."""
    caching = not torch.is_grad_enabled()
    cache = layer.__dict__.get("_peftkit_stack")
    generation = layer.model_state.generation if layer.model_state is not None else 0
    if caching and cache is not None and cache[0] == (tuple(used), generation):
        tensors, versions, got = cache[1], cache[2], cache[3]
        if route.frozen and id(layer) in route.checked:
            return got  # type: ignore[no-any-return]
        if tuple([t._version for t in tensors]) == versions:
            if route.frozen:
                route.checked.add(id(layer))
            return got  # type: ignore[no-any-return]
    pairs: list[tuple[Tensor, Tensor]] = []
    for a in ads:
        f = a.factors()
        if f is None:
            return None
        pairs.append(f)
    parts = []
    for members in _rank_groups([int(pa.shape[0]) for pa, _ in pairs]):
        grp = [pairs[j] for j in members]
        r = max(int(pa.shape[0]) for pa, _ in grp)
        a0, b0 = grp[0]
        at = torch.stack(
            [F.pad(pa, (0, 0, 0, r - pa.shape[0])).t() for pa, _ in grp]
            + [a0.new_zeros(a0.shape[1], r)]
        )  # (k+1, in, r)
        bt = torch.stack(
            [F.pad(pb, (0, r - pb.shape[1])).t() for _, pb in grp]
            + [b0.new_zeros(r, b0.shape[0])]
        )  # (k+1, r, out)
        parts.append(_Part(members, at, bt))
    scales = [a.row_scale() for a in ads]
    g = None
    if any(sc is not None for sc in scales):
        b0 = pairs[0][1]
        one = torch.ones(b0.shape[0], dtype=b0.dtype, device=b0.device)
        g = torch.stack([one if sc is None else sc.to(b0.dtype) for sc in scales] + [one])
    got = _Stack(parts, g)
    if caching:
        # Note: keyed on every tensor's version, the base's too (DoRA's g reads ‖W + sBA‖).
        tensors = [t for m in (*ads, layer.base) for t in (*m.parameters(), *m.buffers())]
        versions = tuple([t._version for t in tensors])
        layer.__dict__["_peftkit_stack"] = ((tuple(used), generation), tensors, versions, got)
    return got


def _eligible(ads: list[Adapter], args: tuple[Any, ...], kw: dict[str, Any]) -> bool:
    """Whether the stacked form may apply: plain input, no embedding, an override of
    :meth:`Adapter.factors`, and no train-mode dropout (each adapter has its own)."""
    if args or kw:
        return False
    for a in ads:
        if a.kind == EMBEDDING or type(a).factors is Adapter.factors:
            return False
        if a.training and torch.is_grad_enabled() and not isinstance(a.dropout, nn.Identity):
            return False
    return True


def _bias(layer: AdaptedLayer) -> Tensor | None:
    b = getattr(layer.base, "bias", None)
    return b if isinstance(b, Tensor) else None


#: Above this many positions, a per-row route gathers each row's factors and runs one batched
#: matmul pair over the rows (the factor copies are small next to the rows' activations). At or
#: below it (a decoding step), and for per-token routes, positions are grouped by adapter instead.
GATHER_MIN_POSITIONS = 65


def routed_forward(
    layer: AdaptedLayer, route: Route, x: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """``layer``'s output with each position's own adapter (see the module docstring)."""
    # Note: one dictionary lookup per layer and input shape once the route has seen them (a
    # decoding step repeats the shape): where the positions go, which adapters, which form.
    key = (id(layer), x.shape, x.device, route.state.generation, torch.is_grad_enabled(),
           layer.training)
    plan = route._layer_plans.get(key)
    if plan.__class__ is _Views:  # a frozen route's decoding step, rows grouped in order
        if not (args or kwargs) and x.is_contiguous() and not layer.base._forward_hooks:
            return plan(layer.base(x), x)
        plan = plan.general
    if plan is None:
        # Note: a route opened per decoding step (a server) repeats the same index: the layer
        # keeps the last few plans by the index's content.
        mine: dict[Any, Any] = layer.__dict__.setdefault("_peftkit_plans", {})
        if mine.get("generation") != route.state.generation:  # adapters added or deleted
            mine.clear()
            mine["generation"] = route.state.generation
        lkey = (route.signature(), *key[1:])
        plan = mine.get(lkey)
        if plan is None:
            plan = _layer_plan(layer, route, x, args, kwargs)
            if len(mine) > 16:  # the least recently used goes
                del mine[next(k for k in mine if k != "generation")]
            mine[lkey] = plan
        else:
            mine[lkey] = mine.pop(lkey)
        route._layer_plans[key] = plan
    lead, slots, used, pos, ads, kind, eligible, extras, solo = plan
    if solo:  # every position uses one adapter: its own forward, as when it is the active one
        one: Tensor = ads[0](x, *args, **kwargs)
        return one
    out: Tensor = layer.base(x, *args, **kwargs)
    if not used:
        return out
    st = _stack(layer, ads, used, route) if eligible and not (args or kwargs) else None
    if st is None:
        return _per_adapter(ads, used, slots, x, out, kind)
    n_out = out.shape[-1]
    n = slots.numel()
    xf = x.reshape(n, x.shape[-1]).to(st.dtype)
    of = out.reshape(n, n_out)
    into_base = st.g is None and of.dtype == st.dtype
    # The updates accumulate onto the base output, or apart (from None: nothing yet) when DoRA's
    # g must scale their sum. In place when no graph is recorded and no hook on the base may
    # have kept its output (an activation capture would otherwise see the update added).
    acc: Tensor | None = of if into_base else None
    inplace = not torch.is_grad_enabled() and not getattr(layer.base, "_forward_hooks", None)
    u = len(used)
    for k, part in enumerate(st.parts):
        if len(st.parts) == 1:
            ppos = pos
        else:  # this group's own slots; the other groups' positions go to its zero slot
            ppos = extras.get(("pos", k))
            if ppos is None:
                local = torch.full((u + 1,), len(part.members), dtype=torch.long)
                local[part.members] = torch.arange(len(part.members))
                ppos = extras[("pos", k)] = local.to(pos.device)[pos]
        pu = len(part.members)
        if len(st.parts) == 1 and route.per_row(lead) and n >= GATHER_MIN_POSITIONS:
            rows = lead[0]
            rpos = ppos.view(rows, -1)[:, 0]  # (rows,)
            h = torch.bmm(xf.view(rows, -1, xf.shape[-1]), part.at[rpos])  # (rows, T, r)
            acc = _plus_bmm(acc, h, part.bt[rpos], inplace)  # B'ᵀ gathered: (rows, r, out)
            continue
        # Positions grouped by adapter, each group zero-padded to the largest: (k, L, in), two
        # bmm's on the stacked factors as they are (no copies of them), each position
        # multiplied by its own adapter's factors only. Base positions are left out.
        groups = extras.get(("groups", k))
        if groups is None:
            groups = extras[("groups", k)] = _groups(ppos, pu)
        tok, dest, width = groups
        if tok is None:  # the positions are the groups, in order and equal: views, no copies
            h = torch.bmm(xf.view(pu, width, -1), part.at_k)  # (k, L, r)
            acc = _plus_bmm(acc, h, part.bt_k, inplace)
            if (
                route.frozen and inplace and into_base and len(st.parts) == 1
                and x.dtype == st.dtype and x.is_contiguous()
            ):
                # Note: the next forwards of this route with this input shape skip the plan,
                # the stack's checks and the branches above: the same two batched matmuls.
                route._layer_plans[key] = _Views(part, width, plan)
            continue
        if tok.numel() == 0:
            continue
        xs = xf.index_select(0, tok)
        if dest is not None:
            xs = xf.new_zeros(pu * width, xf.shape[-1]).index_copy_(0, dest, xs)
        h = torch.bmm(xs.view(pu, width, -1), part.at_k)  # (k, L, r)
        yg = torch.bmm(h, part.bt_k).view(-1, n_out)  # (k·L, out)
        if dest is not None:
            yg = yg.index_select(0, dest)
        if acc is None:
            acc = yg.new_zeros(n, n_out).index_add_(0, tok, yg)
        else:
            acc = acc.index_add_(0, tok, yg) if inplace else acc.index_add(0, tok, yg)
    if into_base:
        assert acc is not None
        return acc.view(out.shape)
    y = of.new_zeros(n, n_out) if acc is None else acc.to(out.dtype)
    if st.g is None:
        return (of + y).view(out.shape)
    g = st.g.to(out.dtype)[pos]  # (n, out): DoRA's m/‖W + sBA‖ per position, 1 for the base
    b = _bias(layer)
    res = g * (of + y) if b is None else g * (of - b + y) + b
    return res.view(out.shape)


class _Views:
    """A frozen route's plan for a layer whose positions are the groups, in order and equal (a
    server's decoding step): the base output plus, in place, each group's ``x Aᵀ B'ᵀ`` by two
    batched matmuls on views. ``general`` is the full plan, for an input this one cannot take."""

    __slots__ = ("at", "bt", "u", "width", "general")

    def __init__(self, part: _Part, width: int, general: tuple[Any, ...]) -> None:
        self.at, self.bt = part.at_k, part.bt_k  # (k, in, r), (k, r, out)
        self.u, self.width, self.general = len(part.members), width, general

    def __call__(self, out: Tensor, x: Tensor) -> Tensor:
        h = torch.bmm(x.view(self.u, self.width, x.shape[-1]), self.at)  # (k, L, r)
        out = out if out.is_contiguous() else out.contiguous()
        out.view(self.u, self.width, out.shape[-1]).baddbmm_(h, self.bt)
        return out


def _plus_bmm(acc: Tensor | None, h: Tensor, bt: Tensor, inplace: bool) -> Tensor:
    """``acc + bmm(h, bt)`` as ``(n, out)``, ``acc`` viewed as ``h``'s batches (None: zero);
    in place when allowed, so the base output is not copied."""
    if acc is None:
        return torch.bmm(h, bt).view(-1, bt.shape[-1])
    a3 = acc.view(h.shape[0], h.shape[1], bt.shape[-1])
    return (a3.baddbmm_(h, bt) if inplace else torch.baddbmm(a3, h, bt)).view(acc.shape)


def _groups(pos: Tensor, u: int) -> tuple[Tensor | None, Tensor | None, int]:
    """For positions whose stack slot is ``pos`` (``u`` = the base): the positions that use an
    adapter, sorted by slot (``tok``; None when that is every position in order, as when a server
    keeps its rows sorted by adapter), where each lands in a ``(u, width)`` grid of groups padded
    to the largest (``dest``; None when the groups fill the grid exactly), and ``width``."""
    valid = (pos < u).nonzero().squeeze(1)
    grp = pos[valid]
    order = torch.argsort(grp, stable=True)
    tok = valid[order]
    counts = torch.bincount(grp, minlength=u)
    width = int(counts.max()) if u else 0
    if bool((counts == width).all()):  # every group full: the sorted positions are the grid
        in_order = torch.arange(tok.numel(), device=tok.device)
        if tok.numel() == pos.numel() and bool((tok == in_order).all()):
            return None, None, width
        return tok, None, width
    starts = torch.cumsum(counts, 0) - counts
    gs = grp[order]
    dest = gs * width + (torch.arange(tok.numel(), device=tok.device) - starts[gs])
    return tok, dest, width


def _layer_plan(
    layer: AdaptedLayer, route: Route, x: Tensor, args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[Any, ...]:
    kind = next(iter(layer.adapters.values())).kind  # type: ignore[attr-defined]
    lead = tuple(x.shape) if kind == EMBEDDING else tuple(x.shape[:-1])
    ids = route.token_ids(lead, x.device)
    slots = _slot_map(layer, route.state, x.device)[ids + 1]  # (n,) this layer's slot, or −1
    used = sorted(int(u) for u in torch.unique(slots).tolist() if u >= 0)
    pos = torch.full_like(slots, len(used))  # index into the stack; len(used) = the zero slot
    for j, u in enumerate(used):
        pos[slots == u] = j
    all_ads = list(layer.adapters.values())
    ads: list[Adapter] = [all_ads[i] for i in used]  # type: ignore[misc]
    extras: dict[Any, Any] = {}  # the grouped form's index tensors, built on demand
    solo = len(used) == 1 and bool((pos == 0).all())
    return lead, slots, used, pos, ads, kind, _eligible(ads, args, kw), extras, solo


def _per_adapter(
    ads: list[Adapter],
    used: list[int],
    slots: Tensor,
    x: Tensor,
    out: Tensor,
    kind: str,
) -> Tensor:
    """The reference path: each adapter in use on the positions that use it."""
    n = slots.numel()
    xf = x.reshape(n) if kind == EMBEDDING else x.reshape(n, x.shape[-1])
    of = out.reshape(n, out.shape[-1])
    for u, a in zip(used, ads, strict=True):
        sel = (slots == u).nonzero().squeeze(1)
        of = of.index_copy(0, sel, a.add_to(xf[sel], of[sel]))
    return of.view(out.shape)


def routed_copies(m: ModulesToSave, route: Route, *args: Any, **kwargs: Any) -> Any:
    """A ``modules_to_save`` module in a mixed batch: each row or token through its adapter's
    trained copy (the original where its adapter has none, or for base rows)."""
    out = m.original(*args, **kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"modules_to_save module {type(m.original).__name__} returns "
            f"{type(out).__name__}; mixed-adapter batches need a tensor output"
        )
    lead = tuple(out.shape[:-1]) if out.dim() > 1 else tuple(out.shape)
    ids = route.token_ids(lead, out.device)  # (n,)
    names = route.state.names()
    for i, name in enumerate(names):
        if name not in m.copies:
            continue
        mask = ids == i
        if not bool(mask.any()):
            continue
        y = m.copies[name](*args, **kwargs)
        mk = mask.view(*lead, *([1] * (out.dim() - len(lead))))
        out = torch.where(mk, y, out)
    return out


# -- the context manager -------------------------------------------------------------------------
def _index(model: nn.Module, state: ModelState, adapters_: Any) -> tuple[Tensor, str]:
    names = state.names()
    if isinstance(adapters_, Tensor):
        if adapters_.dtype in (torch.bool,) or adapters_.is_floating_point():
            raise ValueError(f"adapter ids must be an integer tensor, got {adapters_.dtype}")
        ids = adapters_.detach().to("cpu", torch.long)
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise ValueError(
                f"adapter ids must have shape (B,) per row, (B, T) per token or (N,) for a "
                f"packed batch; got shape {tuple(ids.shape)}"
            )
        bad = ids[(ids < -1) | (ids >= len(names))]
        if bad.numel():
            raise ValueError(
                f"adapter id {int(bad[0])} is out of range: the model has {len(names)} adapters "
                f"{names} (ids 0..{len(names) - 1}, −1 = base)"
            )
        return ids, ROW if ids.dim() == 1 else TOKEN
    if isinstance(adapters_, (str, bytes)) or not isinstance(adapters_, Sequence):
        raise TypeError(
            "route takes one adapter name per row (a list; None = base model) or an integer "
            f"tensor of adapter ids; got {type(adapters_).__name__}"
        )
    if not adapters_:
        raise ValueError("route got an empty list of adapters; give one name per row")
    out = []
    for i, a in enumerate(adapters_):
        if a is None:
            out.append(-1)
        elif isinstance(a, str) and a in state.adapters:
            out.append(names.index(a))
        else:
            raise ValueError(
                f"row {i}: no adapter named {a!r}; the model has {names} (None = base model)"
            )
    return torch.tensor(out, dtype=torch.long), ROW


def _input_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for key in ("input_ids", "inputs_embeds", "x", "input"):
        t = kwargs.get(key)
        if isinstance(t, Tensor):
            return t
    for t in args:
        if isinstance(t, Tensor):
            return t
    # Note: an encoder-decoder's decoding step gets the encoder's output and no input_ids. Its
    # rows are the decoder's, and generate repeats them exactly (the decoder's first tokens are
    # all the start token, so they would show a repetition that is not there).
    enc = kwargs.get("encoder_outputs")
    h = getattr(enc, "last_hidden_state", None)
    if h is None and isinstance(enc, (tuple, list)) and enc:
        h = enc[0]
    if isinstance(h, Tensor):
        return h
    for key in ("decoder_input_ids", "decoder_inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, Tensor):
            return t
    return None


@contextlib.contextmanager
def route(
    model: nn.Module, adapters_: Any, *, packed: bool = False, frozen: bool = False
) -> Iterator[nn.Module]:
    """Run each row (or token) of the batches inside through its own adapter.

    ``adapters_`` is a sequence with one adapter name per row (``None`` = the base model), or an
    integer tensor of indices into :func:`peftkit.adapter_names` (−1 = base): per row ``(B,)``,
    per token ``(B, T)``, or per token of a packed batch ``(N,)`` with ``packed=True``.

    Works in forward, eval and training (each adapter's gradients come from its own rows only,
    so several tasks train in one batch) and in ``model.generate`` (greedy, sampling, beam search,
    ``num_return_sequences``: rows repeated by generate are recognised at the first forward),
    encoder-decoder models included (per row only). ``modules_to_save`` copies (a per-task head)
    are routed too. Raises ``ValueError`` for an unknown name, an id out of range, a wrong length,
    a merged adapter, a Delta-LoRA adapter, or per-token ids for an encoder-decoder model.

    ``frozen=True`` promises that no weight changes while the route is open (a server's decoding
    loop): each layer then checks its cached stacked factors against the weights once per route
    instead of at every forward (a few percent of a small decoding step). A weight changed in
    place inside a frozen route is not seen until the next route.
    """
    root = unwrap(model)
    state = get_state(root)
    assert state is not None
    if state.route is not None:
        raise ValueError("a route is already open on this model; routes do not nest")
    ids, kind = _index(root, state, adapters_)
    if packed:
        if ids.dim() != 1:
            raise ValueError(f"packed=True takes (N,) per-token ids, got {tuple(ids.shape)}")
        kind = PACKED
    # Note: one walk over the layers, however many adapters are loaded.
    for path, layer in state.parts(root)[0]:
        for name, a in layer.adapters.items():
            if a.merged:  # type: ignore[union-attr]
                raise ValueError(
                    f"adapter {name!r} is merged into the base weights (e.g. {path}), which "
                    "every row shares; call peftkit.unmerge(model) before routing a mixed batch"
                )
    for name in state.names():
        method = type(state.adapters[name].config).__name__
        if getattr(state.adapters[name].config, "method", "") == "delta_lora":
            raise ValueError(
                f"adapter {name!r} is Delta-LoRA ({method}), which changes W itself, so its rows "
                "cannot be mixed with others: export it exactly with peftkit.export_lora(model, "
                "DIR, name=...) (a rank-2r LoRA) and load that instead"
            )
    watched = [root]
    if getattr(getattr(root, "config", None), "is_encoder_decoder", False):
        if kind != ROW:
            raise ValueError(
                "per-token routing of an encoder-decoder model is not supported (its encoder and "
                "decoder positions differ); give one adapter per row"
            )
        # Note: generate runs the encoder by itself, before any call of the model: a route that
        # learned beams from an earlier generate must see the prompts' rows there.
        get_encoder = getattr(root, "get_encoder", None)
        encoder = get_encoder() if callable(get_encoder) else None
        if isinstance(encoder, nn.Module) and encoder is not root:
            watched.append(encoder)
    r = Route(state, ids, kind, frozen)

    def observe(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        r.observe(_input_batch(args, kwargs))

    handles = [m.register_forward_pre_hook(observe, with_kwargs=True) for m in watched]
    state.route = r
    try:
        yield model
    finally:
        state.route = None
        for handle in handles:
            handle.remove()
