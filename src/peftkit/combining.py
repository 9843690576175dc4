"""Combining adapters into a new LoRA: the maths of PEFT's ``LoraModel.add_weighted_adapter``,
kept where it is right and corrected where it is wrong (see :func:`combine`).

Per layer, with user weights wᵢ and each source's LoRA form ``ΔWᵢ = sᵢ Bᵢ Aᵢ``:

* ``cat``:   A' = [w₁s₁A₁; w₂s₂A₂; …], B' = [B₁ B₂ …]  →  B'A' = Σ wᵢ ΔWᵢ exactly (rank Σ rᵢ).
* ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``: a merge rule applied to the stack of A
  factors with weights aᵢ = sign(wᵢsᵢ)·√|wᵢsᵢ| and, separately, to the stack of B factors with
  bᵢ = √|wᵢsᵢ|; so B'A' carries cross terms Bᵢ Aⱼ (i ≠ j), as in PEFT.
* ``*_svd`` (``svd`` = task arithmetic): the rule applied to the ΔWᵢ, then the best rank-k
  factors of the result (B' = U_k S_k, A' = V_kᵀ).

Merge rules on task tensors Tᵢ (TIES: Yadav et al., 2023, https://arxiv.org/abs/2306.01708;
DARE: Yu et al., 2023, https://arxiv.org/abs/2311.03099):
  linear Σ wᵢTᵢ; magnitude_prune Σ wᵢ·top_k(Tᵢ); dare_linear Σ wᵢ (mᵢ ⊙ Tᵢ)/density with
  mᵢ ~ Bernoulli(density); ties and dare_ties prune as above, elect a sign per entry from the
  unweighted pruned tensors (``total``: sign Σ T'ᵢ, ``frequency``: sign Σ sign T'ᵢ, 0 → +), and
  take Σ wᵢ T'ᵢ over the agreeing entries divided by how many agree (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .core import (
    CONV1D,
    EMBEDDING,
    Adapter,
    adapted_layers,
    layer_kind,
    model_state,
    modules_to_save,
    unwrap,
)
from .inject import adapt, delete_adapter
from .methods import METHODS
from .methods.lora import LoraConfig, LoraLayer

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
HOWS = ("cat", *FACTOR_TYPES, *SVD_TYPES)
DENSITY_TYPES = tuple(h for h in HOWS if h.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("total", "frequency")


@dataclass
class _Source:
    """One source adapter: its user weight and, per module path, its LoRA form (A, B, s) with
    ``ΔW = s · B @ A``; ``rank`` is its largest layer rank (PEFT's ``max(r, *rank_pattern)``)."""

    name: str
    weight: float
    factors: dict[str, tuple[Tensor, Tensor, float]]
    rank: int


#: the sources that adapt one layer, each as (source, A (r, in), B (out, r), s)
Present = list[tuple[_Source, Tensor, Tensor, float]]


# -- merge rules: pure functions on a list of same-shaped task tensors ----------------------------
def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * keep.view(t.shape)


def prune_random(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density."""
    if density >= 1:
        return t  # Note: no draw, as PEFT, so later masks stay in step with its RNG order.
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def merge_tensors(
    rule: str,
    tensors: list[Tensor],
    weights: list[float],
    *,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> Tensor:
    """Merge task tensors by ``rule`` (a combination type without ``_svd``; ``svd`` is
    ``linear``) with their weights."""
    if rule in ("ties", "magnitude_prune"):
        assert density is not None
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        assert density is not None and generator is not None
        tensors = [prune_random(t, density, generator) for t in tensors]
    stack = torch.stack(tensors)  # (n, *shape)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
    weighted = stack * w.view(-1, *([1] * (stack.dim() - 1)))  # (n, *shape)
    if rule not in ("ties", "dare_ties"):
        return weighted.sum(0)
    votes = stack.sign() if sign_method == "frequency" else stack
    elected = torch.where(votes.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)  # (*shape)
    agree = stack.sign() == elected  # (n, *shape); a zero never agrees
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


# -- per-layer combination -----------------------------------------------------------------------
def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, in), B (out, r) padded with zero rows/columns to ``rank`` (ΔW unchanged)."""
    r = a.shape[0]
    if r == rank:
        return a, b
    a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])  # (rank, in)
    b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)  # (out, rank)
    return a, b


def _cat(
    present: Present,
    sources: list[_Source],
    rank: int,
    shape: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    out_f, in_f = shape
    ref = present[0][1]
    a = ref.new_zeros(rank, in_f)  # (Σr, in)
    b = ref.new_zeros(out_f, rank)  # (out, Σr)
    offsets, at = {}, 0
    for src in sources:
        offsets[src.name], at = at, at + src.rank
    for src, ai, bi, s in present:
        o, r = offsets[src.name], ai.shape[0]
        a[o : o + r] = ai * (src.weight * s)
        b[:, o : o + r] = bi
    return a, b


def _in_factors(
    how: str,
    present: Present,
    rank: int,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    a_w, b_w, a_list, b_list = [], [], [], []
    for src, ai, bi, s in present:
        ws = src.weight * s
        root = math.sqrt(abs(ws))
        a_w.append(root if ws >= 0 else -root)  # the sign goes on A only
        b_w.append(root)
        ai, bi = _pad(ai, bi, rank)
        a_list.append(ai)
        b_list.append(bi)
    # Note: all A masks, then all B masks, per layer: PEFT's order of draws.
    a = merge_tensors(
        how, a_list, a_w, density=density, sign_method=sign_method, generator=generator
    )  # (rank, in)
    b = merge_tensors(
        how, b_list, b_w, density=density, sign_method=sign_method, generator=generator
    )  # (out, rank)
    return a, b


def _svd(
    how: str,
    present: Present,
    rank: int,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
    clamp: float | None,
    stored_t: bool,
) -> tuple[Tensor, Tensor]:
    deltas = [(bi @ ai) * s for _, ai, bi, s in present]  # (out, r) @ (r, in) -> (out, in)
    if stored_t:
        # Note: an embedding or Conv1D stores W as (in, out); PEFT merges ΔW in that layout, so
        # DARE's masks land on the same entries only if drawn there too.
        deltas = [d.T for d in deltas]
    rule = "linear" if how == "svd" else how.removesuffix("_svd")
    d = merge_tensors(
        rule,
        deltas,
        [src.weight for src, *_ in present],
        density=density,
        sign_method=sign_method,
        generator=generator,
    )
    if stored_t:
        d = d.T  # (out, in)
    u, sv, vh = torch.linalg.svd(d, full_matrices=False)  # (out, m), (m,), (m, in)
    k = min(rank, sv.numel())
    b = u[:, :k] * sv[:k]  # (out, k)
    a = vh[:k]  # (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return _pad(a, b, rank)  # a rank above min(out, in) gets zero components


# -- sources -------------------------------------------------------------------------------------
def _lora_form(layer: Adapter) -> tuple[Tensor, Tensor, float]:
    """A source layer as (A, B, s) with ΔW = s·B@A: a LoRA's own factors and scale (what PEFT
    combines), else the method's exact export with the scale folded into B (s = 1, what PEFT
    would see after :func:`peftkit.export_lora`)."""
    if isinstance(layer, LoraLayer) and type(layer).lora_factors is LoraLayer.lora_factors:
        return layer.lora_A.detach(), layer.lora_B.detach(), float(layer.scaling)
    a, b = layer.lora_factors()
    return a.detach(), b.detach(), 1.0


def _source(root: nn.Module, name: str, weight: float) -> _Source:
    config = model_state(root).adapters[name].config
    method = config.method
    if method == "dora":
        raise ValueError(
            f"adapter {name!r} is DoRA: its magnitude vector rescales W + ΔW and is not a LoRA, "
            "so no LoRA combination reproduces it (PEFT silently drops the magnitudes). Merge it "
            "with peftkit.merge_and_unload(model, name=...) instead, or combine plain LoRA "
            "adapters first and train DoRA on the result"
        )
    if METHODS[method].mutates_base:
        raise ValueError(
            f"adapter {name!r} ({method}) changed the base weights, so no other adapter can share "
            "its layers: write its exact LoRA with peftkit.export_lora(model, dir, name=...), "
            "load that into a fresh base model and combine it there"
        )
    saved = [p for p, m in modules_to_save(root) if name in m.copies]
    if saved:
        raise ValueError(
            f"adapter {name!r} trains modules in full ({', '.join(saved)}); combine builds a LoRA "
            "and cannot combine full copies. Combine adapters without modules_to_save"
        )
    factors: dict[str, tuple[Tensor, Tensor, float]] = {}
    for path, layer in adapted_layers(root):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        assert isinstance(adapter, Adapter)
        try:
            factors[path] = _lora_form(adapter)
        except ValueError as e:
            raise ValueError(
                f"adapter {name!r} ({method}) has no exact LoRA form at {path}, so it cannot be "
                f"combined ({e}). Only methods that peftkit.export_lora can write exactly "
                "combine: LoRA, rsLoRA, VeRA, DyLoRA, AdaLoRA, LoRA-FA, DoRA-Mao, MoRA type 1"
            ) from None
    if not factors:
        raise ValueError(f"adapter {name!r} has no adapted layers to combine")
    return _Source(name, weight, factors, max(a.shape[0] for a, _, _ in factors.values()))


# -- the public call -----------------------------------------------------------------------------
def _check_args(
    root: nn.Module,
    weights: object,
    name: object,
    how: object,
    density: object,
    rank: object,
    seed: object,
    sign_method: object,
    svd_clamp: object,
) -> dict[str, float]:
    state = model_state(root)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict of adapter name -> weight, got {type(weights)}")
    if not weights:
        raise ValueError("weights is empty; name at least one adapter, e.g. {'a': 0.7, 'b': 0.3}")
    unknown = [n for n in weights if n not in state.adapters]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {state.names()}")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"the weight of {n!r} must be a finite number, got {w!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if name in state.adapters:
        raise ValueError(
            f"the model already has an adapter named {name!r} (it has {state.names()}); choose "
            "another name or peftkit.delete_adapter(model, name) first"
        )
    if how not in HOWS:
        raise ValueError(f"how={how!r} is not a combination type; use one of {', '.join(HOWS)}")
    if how in DENSITY_TYPES:
        if density is None:
            raise ValueError(
                f"how={how!r} prunes, so it needs density= (the fraction of entries kept, in "
                "(0, 1]), e.g. density=0.5"
            )
        if (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not (0 < density <= 1)
        ):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ValueError(
            f"density= applies to {', '.join(DENSITY_TYPES)}; how={how!r} does not prune"
        )
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}"
        )
    if how not in SVD_TYPES:
        for field, value in (("rank", rank), ("svd_clamp", svd_clamp)):
            if value is not None:
                raise ValueError(
                    f"{field}= applies to the svd types ({', '.join(SVD_TYPES)}), not how={how!r}"
                )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool)
        or not isinstance(svd_clamp, (int, float))
        or not 0 <= svd_clamp <= 1
    ):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return {n: float(w) for n, w in weights.items()}


@torch.no_grad()
def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    *,
    name: str,
    how: str = "cat",
    density: float | None = None,
    rank: int | None = None,
    seed: int | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
) -> nn.Module:
    """Add a new LoRA adapter ``name`` that combines the model's adapters ``weights``
    (``{"a": 0.7, "b": 0.3}``; negative weights subtract), by the maths of PEFT's
    ``add_weighted_adapter`` (module docstring). Returns the model.

    ``how``: ``cat`` (default) is the exact weighted sum Σ wᵢ ΔWᵢ, at rank Σ rᵢ. ``svd`` is the
    best rank-``rank`` approximation of that sum: exact only when ``rank`` ≥ the sum's rank (up
    to Σ rᵢ); the default ``rank`` is the largest source rank, as PEFT, which truncates.
    ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` act on the A and
    B factors separately (PEFT's maths, cross terms included): rough approximations, which need
    sources of one rank. ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and
    ``magnitude_prune_svd`` apply their rule to the ΔWᵢ, then factor at ``rank``. ``density``:
    the fraction of entries kept by the pruning types. ``majority_sign_method``: TIES' sign
    election. ``svd_clamp``: clamp the SVD factors to this quantile of their entries (PEFT's).
    With one source every type is ``linear``, as in PEFT: the result is exactly w·ΔW.

    The new adapter targets every module a source adapts (a layer some sources skip gets zeros
    from them), has scale 1 (``r = lora_alpha = its rank``), is frozen and is not activated
    (``set_adapter(model, name)``); it saves and loads like any other adapter.

    Where this differs from PEFT 0.21.2, on purpose:

    * rsLoRA sources: each source's own scale is used and the result has scale exactly 1. PEFT
      copies ``use_rslora`` into the result, whose scale becomes √r instead of 1.
    * Sources that are not plain LoRA are combined through their exact LoRA form (VeRA, DyLoRA
      at its rank, AdaLoRA after pruning, LoRA-FA, DoRA-Mao, MoRA type 1; the scale sits in B).
      DoRA is refused (its magnitude is not a LoRA; PEFT silently drops it), as are methods with
      no exact LoRA form (MoRA type 6), Delta-LoRA in place (export it first) and adapters with
      ``modules_to_save``.
    * Errors instead of silence or crashes: an existing ``name`` (PEFT returns doing nothing), a
      missing ``density`` (PEFT raises ``TypeError``), ``density`` outside (0, 1], an unknown
      adapter, empty ``weights``, unequal ranks for the factor types, and ``density``/``rank``
      given to a type that ignores them.
    * DARE draws its masks from a local generator seeded by ``seed`` (None: one seed drawn from
      torch's global generator), never the global stream itself, and the new layers' init does
      not move the caller's stream. The masks are drawn in PEFT's order (per layer, A then B,
      sources in order), so they are the ones PEFT draws from a global generator in the same
      state once its own init draws are set aside (the tests check this).
    * Sources whose layers have different ranks (``rank_pattern``, AdaLoRA) are zero-padded to
      the result's rank, and ``rank`` above a layer's ``min(in, out)`` gets zero components,
      where PEFT fails on the shapes. The maths runs in at least float32.
    """
    root = unwrap(model)
    w = _check_args(root, weights, name, how, density, rank, seed, majority_sign_method, svd_clamp)
    sources = [_source(root, n, wt) for n, wt in w.items()]
    if len(sources) == 1:
        how = "linear"
    ranks = {s.name: s.rank for s in sources}
    if how in FACTOR_TYPES:
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"how={how!r} combines the factors, so the adapters need one rank; they have "
                f"{ranks}. 'cat' and the svd types ({', '.join(SVD_TYPES)}) accept different "
                "ranks"
            )
        new_rank = sources[0].rank
    elif how == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = rank if rank is not None else max(ranks.values())
    generators: dict[torch.device, torch.Generator] = {}
    if how.startswith("dare") and seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())

    def generator(device: torch.device) -> torch.Generator | None:
        if seed is None:
            return None
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    new: dict[str, tuple[Tensor, Tensor]] = {}
    for path, layer in adapted_layers(root):
        present: Present = []
        for src in sources:
            if path in src.factors:
                a, b, s = src.factors[path]
                dt = torch.promote_types(a.dtype, torch.float32)
                present.append((src, a.to(dt), b.to(device=a.device, dtype=dt), s))
        if not present:
            continue
        if how == "cat":
            shape = (present[0][2].shape[0], present[0][1].shape[1])
            new[path] = _cat(present, sources, new_rank, shape)
        elif how in FACTOR_TYPES:
            g = generator(present[0][1].device)
            new[path] = _in_factors(how, present, new_rank, density, majority_sign_method, g)
        else:
            g = generator(present[0][1].device)
            stored_t = layer_kind(layer.base) in (EMBEDDING, CONV1D)
            new[path] = _svd(
                how, present, new_rank, density, majority_sign_method, g, svd_clamp, stored_t
            )

    config = LoraConfig(r=new_rank, lora_alpha=new_rank, target_modules=tuple(new))
    cuda = sorted({a.device.index or 0 for a, _ in new.values() if a.device.type == "cuda"})
    # Note: the new layers' random init is overwritten below; fork_rng keeps it from moving the
    # caller's random stream.
    with torch.random.fork_rng(devices=cuda):
        adapt(root, config, name=name)
    try:
        for path, layer in adapted_layers(root):
            if name not in layer.adapters:
                continue
            target = layer.adapters[name]
            assert isinstance(target, LoraLayer)
            a, b = new[path]
            target.lora_A.copy_(a)
            target.lora_B.copy_(b)
            target.requires_grad_(False)
    except BaseException:
        delete_adapter(root, name)
        raise
    return model
