"""Optimizer parameter groups by declared role: LoRA+ (Hayou, Ghosh & Yu, ICML 2024,
https://arxiv.org/abs/2402.12354).

LoRA+ leaves the model ``h = W₀x + s·B A x`` unchanged and gives the two factors different
learning rates, ``η_B = λ·η_A``: in the infinite-width limit, efficient feature learning with an
Adam-type optimizer needs ``η_A = Θ(1/n)`` and ``η_B = Θ(1)``, so one shared rate either
destabilises B or starves A. The paper's default ratio is λ = 2⁴ = 16; re-tune ``lr`` (= η_A)
when changing λ.

    groups = peftkit.param_groups(model, lr=1e-4, loraplus_ratio=16, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)

Groups come from the roles adapters declare (``Adapter.roles``), never from parameter names.
Each role joins one group through :data:`ROLE_GROUPS`; a role missing from the table joins the
``"A"`` group (the base rate), so a new method's parameters are never boosted by accident. A
method that adds a role adds one row here.

Which group each role joins, and why (λ = ``loraplus_ratio``):

    role (method)                       group      lr
    A (LoRA, LoRA-FA, Delta-LoRA,       A          lr       fan-in is the layer width, so the
      DyLoRA, DoRA, AdaLoRA's Q)                            theory's Θ(1/n)
    B (the same methods; AdaLoRA's P)   B          lr·λ     fan-in is the rank r, fixed as the
                                                            width grows: Θ(1)
    magnitude (DoRA)                    B          lr·λ     one scale per output row, fan-in 1:
                                                            B's argument applies (PEFT: lr·λ too)
    lambda_b, lambda_d (VeRA)           B          lr·λ     diagonal scalings, fan-in 1
    lambda (AdaLoRA's E)                B          lr·λ     diagonal singular values, fan-in 1,
                                                            zero at init: B's place in LoRA
                                                            (PEFT's shape rule gives E lr)
    scaler (DoRA-Mao's c)               B          lr·λ     one zero-initialised scale per rank-1
                                                            component, as AdaLoRA's E
    M (MoRA)                            A          lr       the only trained matrix: no partner,
                                                            no ratio to set, so the base rate
    any other role                      A          lr       never boost a role that has not
                                                            opted in
    any role, adapter on nn.Embedding   embedding  embedding_lr   one-hot vocabulary-sized input:
                                                            the width argument does not apply;
                                                            the reference code and PEFT use 1e-6
    trainable, outside any adapter      other      lr       ordinary fine-tuning (modules_to_save
      (modules_to_save, unfrozen by hand)                   copies), not a low-rank factor

Every group gets ``weight_decay`` exactly as given. Deviations from PEFT's
``create_loraplus_optimizer`` (same lr for every A, B and embedding factor): PEFT reads weight decay
from ``loraplus_weight_decay`` and silently sets every group's to 0 when ``weight_decay=`` is
passed; and PEFT sorts by name and shape, so a 1-D ``modules_to_save`` tensor (a head's bias, a
LayerNorm) gets lr·λ without decay while a 2-D one gets lr — here both are ``other`` (lr,
``weight_decay``). LoRA+ saves nothing: checkpoints are the method's own files; resuming needs the
optimizer state, built from the same groups (their order is the model's parameter order).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .core import EMBEDDING, adapters, unwrap
from .paged import PagedAdamW

#: role -> group. Groups: ``"A"`` (lr), ``"B"`` (lr × ratio); see the module docstring.
ROLE_GROUPS: dict[str, str] = {
    "A": "A",
    "B": "B",
    "magnitude": "B",
    "lambda_b": "B",
    "lambda_d": "B",
    "lambda": "B",
    "scaler": "B",
    "M": "A",
}
#: the group of a role missing from :data:`ROLE_GROUPS`
DEFAULT_GROUP = "A"
GROUP_ORDER = ("A", "B", "embedding", "other")


def _check(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}"
            + ("; LoRA+'s default ratio is 16" if name == "loraplus_ratio" else "")
        )
    return float(value)


def role_group(role: str) -> str:
    """The group (``"A"`` or ``"B"``) a parameter of ``role`` joins on a non-embedding layer."""
    return ROLE_GROUPS.get(role, DEFAULT_GROUP)


def param_groups(
    model: nn.Module,
    lr: float,
    loraplus_ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups of ``model``'s trainable parameters, for any torch optimizer.

    Returns up to four groups, each ``{"name", "params", "lr", "weight_decay"}`` (empty groups
    left out): ``"A"`` at ``lr``, ``"B"`` at ``lr * loraplus_ratio``, ``"embedding"`` (every factor
    of an adapter on an embedding) at ``embedding_lr``, and ``"other"`` (trainable parameters
    outside adapters) at ``lr``. Frozen parameters (LoRA-FA's A) are left out. With
    ``loraplus_ratio=1`` and ``embedding_lr=lr`` every parameter trains at ``lr``.
    """
    lr = _check("lr", lr)
    ratio = _check("loraplus_ratio", loraplus_ratio, positive=True)
    weight_decay = _check("weight_decay", weight_decay)
    embedding_lr = _check("embedding_lr", embedding_lr)
    root = unwrap(model)
    group_of: dict[int, str] = {}
    for _, layer in adapters(root):
        for pname, role in layer.roles.items():
            p = getattr(layer, pname, None)
            if isinstance(p, nn.Parameter):
                group_of[id(p)] = "embedding" if layer.kind == EMBEDDING else role_group(role)
    rates = {"A": lr, "B": lr * ratio, "embedding": embedding_lr, "other": lr}
    members: dict[str, list[nn.Parameter]] = {g: [] for g in GROUP_ORDER}
    seen: set[int] = set()
    for p in root.parameters():  # the model's order: stable across runs, so resumes line up
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        members[group_of.get(id(p), "other")].append(p)
    if not seen:
        raise ValueError(
            "model has no trainable parameters; call peftkit.adapt(model, config) first"
        )
    return [
        {"name": g, "params": members[g], "lr": rates[g], "weight_decay": weight_decay}
        for g in GROUP_ORDER
        if members[g]
    ]


__all__ = ["DEFAULT_GROUP", "ROLE_GROUPS", "PagedAdamW", "param_groups", "role_group"]
