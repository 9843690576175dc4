"""PagedAdamW: bitwise equal to torch.optim.AdamW (foreach=False), chunked or not, and resumable."""

import copy

import pytest
import torch
from torch import nn

from peftkit.paged import PagedAdamW

HP = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 5)).to(device)
    m[0].bias.requires_grad_(False)  # a parameter without grad is skipped, as by AdamW
    return m


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 37, generator=g).to(dev)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("page_numel", [1 << 22, 100, 7])
@pytest.mark.parametrize("hp", [HP, {}, {**HP, "weight_decay": 0.0}])
def test_bitwise_equal_to_torch_adamw(page_numel, hp):
    ref, paged = _model(), _model()
    _train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **hp), 6)
    _train(paged, PagedAdamW(paged.parameters(), page_numel=page_numel, **hp), 6)
    _assert_bitwise(ref, paged)


def test_param_groups_and_default_adamw_path():
    ref, paged = _model(), _model()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 1e-2},
        {"params": m[2].parameters(), "weight_decay": 0.0},
    ]
    _train(ref, torch.optim.AdamW(groups(ref), **HP), 4)  # CPU default is the single-tensor path
    _train(paged, PagedAdamW(groups(paged), page_numel=50, **HP), 4)
    _assert_bitwise(ref, paged)


def test_state_dict_round_trip_resumes_exactly():
    ref, paged = _model(), _model()
    opt_ref = torch.optim.AdamW(ref.parameters(), foreach=False, **HP)
    opt = PagedAdamW(paged.parameters(), **HP)
    _train(ref, opt_ref, 3)
    _train(paged, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch AdamW's keys
    resumed = PagedAdamW(paged.parameters(), **HP)
    resumed.load_state_dict(sd)
    for p in paged.parameters():
        if p.requires_grad:
            st = resumed.state[p]
            assert st["exp_avg"].device.type == "cpu"
            assert float(st["step"]) == 3.0
    _train(ref, opt_ref, 3, seed=2)
    _train(paged, resumed, 3, seed=2)
    _assert_bitwise(ref, paged)
    # a torch AdamW checkpoint loads too (same state layout)
    again = PagedAdamW(paged.parameters(), **HP)
    again.load_state_dict(opt_ref.state_dict())


def test_states_live_in_host_memory():
    m = _model()
    opt = PagedAdamW(m.parameters())
    _train(m, opt, 1)
    for st in opt.state.values():
        assert st["exp_avg"].device.type == "cpu" and st["exp_avg_sq"].device.type == "cpu"


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": -1.0},
        {"eps": -1e-8},
        {"betas": (1.0, 0.9)},
        {"weight_decay": -0.1},
        {"page_numel": 0},
    ],
)
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError):
        PagedAdamW(_model().parameters(), **kw)


def test_closure_returns_loss():
    m = _model()
    opt = PagedAdamW(m.parameters())
    x = torch.randn(4, 37)

    def closure():
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paging_bitwise_equal():
    ref, paged = _model("cuda"), _model("cuda")
    _train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **HP), 5)
    opt = PagedAdamW(paged.parameters(), page_numel=300, **HP)
    _train(paged, opt, 5)
    _assert_bitwise(ref, paged)
    for st in opt.state.values():
        assert st["exp_avg"].device.type == "cpu" and st["exp_avg"].is_pinned()
