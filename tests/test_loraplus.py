"""LoRA+ parameter groups: PEFT's ``create_loraplus_optimizer`` as the oracle for every factor's
learning rate, groups from declared roles (never names), weight decay honoured as given."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from conftest import MODELS, ids, output, sole
from torch import nn

import peftkit
from peftkit.core import Adapter
from peftkit.optim import DEFAULT_GROUP, ROLE_GROUPS, param_groups
from peftkit.state import adapter_tensors

LR, RATIO = 1e-4, 16.0


def lr_by_param(groups: list[dict]) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


def test_same_learning_rates_as_peft() -> None:
    import peft
    from peft.optimizers import create_loraplus_optimizer

    targets = ["fc1", "fc2", "embed"]
    ours = MODELS["mlp"](0)
    peftkit.adapt(ours, peftkit.LoraConfig(r=4, target_modules=targets, modules_to_save=["head"]))
    theirs = peft.get_peft_model(
        MODELS["mlp"](0), peft.LoraConfig(r=4, target_modules=targets, modules_to_save=["head"])
    )
    opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, weight_decay=0.1
    )
    peft_lr = {}
    for g in opt.param_groups:
        for p in g["params"]:
            peft_lr[id(p)] = (g["lr"], g["weight_decay"])
    # PEFT's parameter names -> the file keys both libraries write
    peft_by_key = {}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = name.replace(".modules_to_save.default", "").replace(".default", "")
            peft_by_key[key] = peft_lr[id(p)]
    ours_lr = lr_by_param(param_groups(ours, LR, loraplus_ratio=RATIO, weight_decay=0.1))
    keys = adapter_tensors(ours)
    assert set(keys) == set(peft_by_key)
    for key, t in keys.items():
        lr, wd = ours_lr[id(t)]
        assert wd == 0.1, "weight decay honoured as given"
        assert peft_by_key[key][1] == 0.0, "PEFT silently overrides weight_decay to 0"
        if key.endswith("head.bias"):
            # Documented deviation: PEFT's shape rule boosts every 1-D tensor; here a
            # modules_to_save tensor is ordinary fine-tuning at the base lr.
            assert (lr, peft_by_key[key][0]) == (LR, LR * RATIO)
        else:
            assert lr == pytest.approx(peft_by_key[key][0], rel=1e-12), key
    # the factors themselves, spelled out
    assert ours_lr[id(sole(ours.fc1).lora_A)][0] == LR
    assert ours_lr[id(sole(ours.fc1).lora_B)][0] == pytest.approx(LR * RATIO)
    emb = sole(ours.embed)
    assert ours_lr[id(emb.lora_A)][0] == ours_lr[id(emb.lora_B)][0] == 1e-6


class OddlyNamed(Adapter):
    """Names that no substring rule would sort; roles say what each is."""

    roles: ClassVar[dict[str, str]] = {
        "down": "A",
        "up": "B",
        "gain": "magnitude",
        "mid": "M",
        "zeta": "unheard_of",
    }

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.down = nn.Parameter(torch.randn(2, self.in_features))
        self.up = nn.Parameter(torch.zeros(self.out_features, 2))
        self.gain = nn.Parameter(torch.ones(self.out_features))
        self.mid = nn.Parameter(torch.eye(2))
        self.zeta = nn.Parameter(torch.ones(2))
        self.lora_B = nn.Parameter(torch.zeros(1))  # a misleading name with no role

    def update(self, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.down.T) @ self.mid * self.zeta  # (..., 2)
        return (h @ self.up.T) * self.gain + self.lora_B  # (..., out)


def test_groups_follow_roles_not_names() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    model[0] = layer = OddlyNamed(model[0])
    groups = param_groups(model, LR, loraplus_ratio=RATIO)
    by = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert by["A"] == {id(layer.down), id(layer.mid), id(layer.zeta)}
    assert by["B"] == {id(layer.up), id(layer.gain)}
    assert by["other"] == {id(layer.lora_B)}  # no role: not a factor, whatever its name
    assert ROLE_GROUPS.get("unheard_of", DEFAULT_GROUP) == "A"
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates == {"A": LR, "B": LR * RATIO, "other": LR}


def test_every_trainable_parameter_once_and_frozen_ones_never() -> None:
    model = MODELS["llama"](0)
    peftkit.adapt(model, peftkit.LoraFAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    groups = param_groups(model, LR)
    got = [id(p) for g in groups for p in g["params"]]
    want = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    assert [g["name"] for g in groups] == ["B"]  # LoRA-FA's frozen A joins no group


def test_one_adamw_step_moves_b_ratio_times_further() -> None:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for _, a in peftkit.adapters(model):
            a.lora_B.normal_()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt = torch.optim.AdamW(param_groups(model, LR, loraplus_ratio=RATIO), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    output(model, ids()).pow(2).mean().backward()
    opt.step()
    # Adam's first step moves every coordinate by lr · sign(g) (up to eps)
    step_a = (sole(model.fc1).lora_A - before[id(sole(model.fc1).lora_A)]).abs().max().item()
    step_b = (sole(model.fc1).lora_B - before[id(sole(model.fc1).lora_B)]).abs().max().item()
    assert step_a == pytest.approx(LR, rel=1e-3)
    assert step_b == pytest.approx(LR * RATIO, rel=1e-3)
    sched.step()
    sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["B"] / lrs["A"] == pytest.approx(RATIO)


def test_method_roles_land_where_the_table_says() -> None:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["fc1"], use_dora=True))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, LR)}
    layer = sole(model.fc1)
    assert id(layer.lora_magnitude_vector) in groups["B"]
    assert id(layer.lora_A) in groups["A"] and id(layer.lora_B) in groups["B"]


def test_paged_adamw_takes_the_groups() -> None:
    from peftkit.optim import PagedAdamW

    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["fc1"]))
    opt = PagedAdamW(param_groups(model, LR, weight_decay=0.01), lr=LR)
    output(model, ids()).sum().backward()
    opt.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"loraplus_ratio": 0}, "loraplus_ratio"),
        ({"loraplus_ratio": -16}, "loraplus_ratio"),
        ({"loraplus_ratio": math.nan}, "loraplus_ratio"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"embedding_lr": math.inf}, "embedding_lr"),
    ],
)
def test_bad_values_name_the_argument(kwargs: dict, field: str) -> None:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["fc1"]))
    args = {"lr": LR, **kwargs}
    with pytest.raises(ValueError, match=field):
        param_groups(model, **args)


def test_nothing_trainable_is_an_error() -> None:
    model = MODELS["mlp"](0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="adapt"):
        param_groups(model, LR)
