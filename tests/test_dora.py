"""Weight-decomposed DoRA (Liu et al., 2024): the paper's equations computed densely are the
oracle for outputs, gradients (norm detached, §4.3) and merges; PEFT 0.21.2 is the oracle for
files and training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, ids, output
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftkit
from peftkit.core import dense_weight
from peftkit.methods import method_for_dict
from peftkit.methods.dora import DoraLayer, _DoraDropoutFn, _DoraFn, _DoraLinearFn, row_norms
from peftkit.methods.lora import LoraLayer

D64 = torch.float64


def conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.3)
    return layer


BASES = {
    "linear": lambda: nn.Linear(12, 10),
    "linear-nobias": lambda: nn.Linear(12, 10, bias=False),
    "conv1d": lambda: conv1d(12, 10),
    "embedding": lambda: nn.Embedding(12, 10, padding_idx=1),
}


def make(
    kind: str,
    *,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = D64,
    dead: bool = False,
    path: str = "folded",
) -> DoraLayer:
    """A DoRA layer with non-trivial A, B and m (m ≠ ‖W + sBA‖). ``path="general"`` turns
    off the folded-scale function (``_DoraLinearFn``), which the default inputs would take."""
    torch.manual_seed(seed)
    layer = DoraLayer(
        BASES[kind]().to(dtype).requires_grad_(False), r=3, alpha=6.0, scaling=2.0, dropout=dropout
    )
    layer.fold_scale = path == "folded"  # type: ignore[misc]
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(10, dtype=dtype))
        if dead:
            layer.lora_magnitude_vector[[0, 3]] = 0.0
    return layer


def inputs(kind: str, dtype: torch.dtype = D64) -> Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "embedding":
        return torch.randint(0, 12, (2, 7), generator=g)
    return torch.randn(2, 7, 12, generator=g, dtype=dtype).requires_grad_(True)


def dense_reference(layer: DoraLayer, x: Tensor, xd: Tensor | None = None) -> Tensor:
    """The paper's forward with n detached, densely; ``xd``: PEFT's dropout formula."""
    w = dense_weight(layer.base)  # (out, in)
    v = w + layer.scaling * layer.lora_B @ layer.lora_A  # (out, r) @ (r, in)
    g = layer.lora_magnitude_vector / torch.linalg.vector_norm(v, dim=1).detach()
    if layer.kind == "embedding":
        return F.embedding(x, (g[:, None] * v).T)  # (..., out)
    b = layer.base.bias
    if xd is None:
        y = F.linear(x, g[:, None] * v)
        return y if b is None else y + b
    return (
        layer.base(x)
        + (g - 1) * F.linear(xd, w)
        + g * F.linear(xd, layer.scaling * layer.lora_B @ layer.lora_A)
    )


def trainables(layer: DoraLayer, x: Tensor) -> list[Tensor]:
    ps = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    return ps + ([x] if x.is_floating_point() else [])


@pytest.mark.parametrize("kind", list(BASES))
def test_factored_norm_equals_dense(kind: str) -> None:
    layer = make(kind)
    w = dense_weight(layer.base)
    dense = torch.linalg.vector_norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(layer.weight_norm(), dense.detach(), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(
        row_norms(w, layer.lora_A, layer.lora_B, 2.0), dense.detach(), atol=1e-13, rtol=1e-13
    )
    # bf16 weights: the norm is still computed in fp32 (PEFT's bf16 norm is coarser)
    wb = w.detach().to(torch.bfloat16)
    ref = torch.linalg.vector_norm(wb.double() + 2.0 * layer.lora_B @ layer.lora_A, dim=1)
    got = row_norms(wb, layer.lora_A.float(), layer.lora_B.float(), 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-2, atol=0)


# (kind, path): both autograd paths for the dense bases; an embedding has one
KIND_PATHS = [(k, p) for k in BASES for p in ("folded", "general") if k != "embedding"] + [
    ("embedding", "general")
]


def check_path(layer: DoraLayer, x: Tensor, path: str) -> None:
    assert layer._fused_ok(x) == (path == "folded")


@pytest.mark.parametrize(("kind", "path"), KIND_PATHS)
def test_forward_and_gradients_equal_the_dense_formula(kind: str, path: str) -> None:
    layer = make(kind, path=path)
    x = inputs(kind)
    check_path(layer, x, path)
    y, ref = layer(x), dense_reference(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, trainables(layer, x), dy)
    want = torch.autograd.grad(ref, trainables(layer, x), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", ["folded", "general"])
@pytest.mark.parametrize("frozen", ["lora_A", "lora_B", "lora_magnitude_vector", "x"])
def test_gradients_with_parts_frozen_equal_the_dense_formula(frozen: str, path: str) -> None:
    # backward skips what needs no gradient (h is recomputed only for ∂B and dead rows)
    layer = make("linear", dead=frozen == "lora_B", path=path)
    x = inputs("linear")
    if frozen == "x":
        x.requires_grad_(False)
    else:
        getattr(layer, frozen).requires_grad_(False)
    wrt = [t for t in trainables(layer, x) if t.requires_grad]
    y, ref = layer(x), dense_reference(layer, x)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, wrt, dy)
    want = torch.autograd.grad(ref, wrt, dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("kind", "path"), [kp for kp in KIND_PATHS if kp[0] != "linear-nobias"])
def test_dead_rows_get_the_exact_magnitude_gradient(kind: str, path: str) -> None:
    # m = 0 erases z from y; those rows recompute it instead of dividing by m
    layer = make(kind, dead=True, path=path)
    x = inputs(kind)
    check_path(layer, x, path)
    y, ref = layer(x), dense_reference(layer, x)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, trainables(layer, x), dy)
    want = torch.autograd.grad(ref, trainables(layer, x), dy)
    assert got[2][0] != 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_follows_peft(kind: str) -> None:
    layer = make(kind, dropout=0.4).train()
    x = inputs(kind)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.4, training=True)
    ref = dense_reference(layer, x, xd)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, trainables(layer, x), dy)
    want = torch.autograd.grad(ref, trainables(layer, x), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    layer.eval()  # eval: no dropout, the paper's formula
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-12, rtol=0)


def test_gradcheck_of_the_autograd_functions() -> None:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(True)

    out, x, a, h, b, m = r(2, 3, 5), r(2, 3, 4), r(2, 4), r(2, 3, 2), r(5, 2), r(5)
    norm = torch.rand(5, generator=g, dtype=D64) + 0.5
    bias = torch.randn(5, generator=g, dtype=D64)
    w = torch.randn(5, 4, generator=g, dtype=D64)

    def rows(x: Tensor, idx: Tensor) -> Tensor:  # columns idx of o - bias, (T, k)
        return (F.linear(x.reshape(-1, 4), w) + out.detach().reshape(-1, 5))[:, idx]

    def fn(out: Tensor, x: Tensor, a: Tensor, b: Tensor, m: Tensor) -> Tensor:
        # the base output o: dead rows recompute its columns with rows()
        o = F.linear(x, w, bias) + out
        return _DoraFn.apply(o, x, a, None, b, m, norm, bias, 1.5, rows)  # type: ignore[no-any-return]

    def fn_h(out: Tensor, h: Tensor, b: Tensor, m: Tensor) -> Tensor:  # h given (embeddings)
        o = F.linear(x.detach(), w, bias) + out
        return _DoraFn.apply(o, x.detach(), None, h, b, m, norm, bias, 1.5, rows)  # type: ignore[no-any-return]

    assert torch.autograd.gradcheck(fn, (out, x, a, b, m))
    assert torch.autograd.gradcheck(fn_h, (out, h, b, m))
    with torch.no_grad():
        m[1] = 0.0  # a dead row: the recompute branch
    assert torch.autograd.gradcheck(fn, (out, x, a, b, m))
    assert torch.autograd.gradcheck(fn_h, (out, h, b, m))
    od = r(2, 3, 5)
    assert torch.autograd.gradcheck(
        lambda o, d, x, a, b, m: _DoraDropoutFn.apply(o, d, x, a, b, m, norm, 1.5),
        (out, od, x, a, b, m),
    )


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_of_the_folded_function(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(True)

    x, a, b, m, bias = r(2, 3, 4), r(2, 4), r(5, 2), r(5), r(5)
    w = torch.randn(5, 4, generator=g, dtype=D64)
    norm = torch.rand(5, generator=g, dtype=D64) + 0.5

    def rows(x: Tensor, idx: Tensor) -> Tensor:  # columns idx of x Wᵀ, (T, k)
        return F.linear(x.reshape(-1, 4), w[idx])

    def fn(x: Tensor, a: Tensor, b: Tensor, m: Tensor, bias: Tensor) -> Tensor:
        c = bias if with_bias else None
        return _DoraLinearFn.apply(x, w, c, a, b, m, norm, 1.5, rows)  # type: ignore[no-any-return]

    assert torch.autograd.gradcheck(fn, (x, a, b, m, bias))
    with torch.no_grad():
        m[1] = 0.0  # a dead row: the recompute branch
    assert torch.autograd.gradcheck(fn, (x, a, b, m, bias))


class ShapeLog(TorchDispatchMode):
    """Records the shape of every new tensor an op makes; ``dense`` keeps the (10, 12) or
    (12, 10) ones (the layers' W shape) with the op that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.dense: list[tuple[str, Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in [*args, *(kwargs or {}).values()]
            if isinstance(t, Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in given:
                self.shapes.append(tuple(t.shape))  # a new tensor, not a view
                if tuple(t.shape) in ((10, 12), (12, 10)):
                    self.dense.append((str(func), t.detach().clone()))
        return out


def saved_storages(run: Any, owned: set[int]) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage autograd saves during ``run()``, parameters
    excluded; the backward is run."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run()
    y.sum().backward()
    return saved


@pytest.mark.parametrize(("kind", "path"), [kp for kp in KIND_PATHS if kp[0] != "linear-nobias"])
def test_training_never_forms_ba_and_saves_only_x_y(kind: str, path: str) -> None:
    layer = make(kind, dtype=torch.float32, path=path)
    x = inputs(kind, torch.float32)
    check_path(layer, x, path)
    layer(x).sum().backward()  # the first forward fills the ‖W‖² cache
    layer.zero_grad()
    mine = (*layer.parameters(), *layer.base.parameters())
    owned = {p.untyped_storage().data_ptr() for p in mine}
    with ShapeLog() as log:
        saved = saved_storages(lambda: layer(x), owned)
    w = dense_weight(layer.base)
    if path == "general":
        assert not log.dense
    else:
        # g⊙W, once in each direction, and nothing else W-sized: each row a multiple of W's,
        # so no BA in it
        assert [op for op, _ in log.dense] == ["aten.mul.Tensor"] * 2
        for _, t in log.dense:
            ratio = t / w
            torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
            assert not torch.allclose(ratio, torch.ones_like(ratio))  # g ≠ 1: a real scaling
    # x (shared with the LoRA branch), y and the norm vector. h = x Aᵀ (T, r) is recomputed by
    # the general path and kept by the folded one; an embedding's gathered h is saved too.
    kept_h = kind == "embedding" or path == "folded"
    assert sorted(saved.values()) == sorted(
        [x.numel() * x.element_size(), 14 * 10 * 4, 10 * 4] + ([14 * 3 * 4] if kept_h else [])
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(2, 7, 12, 10, 3), (4, 33, 8, 24, 16), (1, 5, 40, 6, 2)])
def test_saves_no_more_than_lora_plus_one_output(kind: str, shape: tuple[int, ...]) -> None:
    # Whatever the sizes: DoRA saves LoRA's activations (x and h; the general path recomputes
    # h), plus y and the norms: at most LoRA's bytes plus one output-sized tensor and an (out,)
    # vector. The first two shapes take the folded path, the third (5 tokens, in 40) does not.
    n, t, d_in, d_out, r = shape
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out) if kind == "linear" else conv1d(d_in, d_out)
    base.requires_grad_(False)
    x = torch.randn(n, t, d_in, requires_grad=True)
    lora, dora = (
        cls(base, r=r, alpha=2.0 * r, scaling=2.0, init=False) for cls in (LoraLayer, DoraLayer)
    )
    # LoRA's two-GEMM form (x and h saved); its merged-weight path on nn.Linear saves only x.
    lora.merged_matmul = False  # type: ignore[misc]
    owned = {p.untyped_storage().data_ptr() for m in (lora, dora, base) for p in m.parameters()}
    lora_saved = saved_storages(lambda: lora(x), owned)
    dora_saved = saved_storages(lambda: dora(x), owned)
    y_bytes, h_bytes = n * t * d_out * 4, n * t * r * 4
    assert sum(lora_saved.values()) == n * t * d_in * 4 + h_bytes
    folded = dora._fused_ok(x)
    assert folded == (t > 5)
    recomputed = 0 if folded else h_bytes
    assert sum(dora_saved.values()) == sum(lora_saved.values()) - recomputed + y_bytes + d_out * 4
    assert sum(dora_saved.values()) <= sum(lora_saved.values()) + y_bytes + d_out * 4
    # y is the very tensor returned: an op after the layer that saves its input (SiLU here)
    # shares its storage, so the layer's y costs nothing extra there
    both = saved_storages(lambda: F.silu(dora(x)), owned)
    assert sum(both.values()) == sum(dora_saved.values())


@pytest.mark.parametrize("path", ["folded", "general"])
def test_a_trained_bias_gets_its_whole_gradient(path: str) -> None:
    # y = g ⊙ (W + sBA) x + b: ∂L/∂b = Σ ∂L/∂y on either path
    layer = make("linear", path=path)
    layer.base.bias.requires_grad_(True)
    x = inputs("linear")
    check_path(layer, x, path)
    y, ref = layer(x), dense_reference(layer, x)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [layer.base.bias], dy)[0]
    want = torch.autograd.grad(ref, [layer.base.bias], dy)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, dy.sum((0, 1)), atol=1e-12, rtol=1e-10)


def test_the_folded_path_steps_aside_for_hooks_and_cpu_autocast() -> None:
    layer = make("linear", dtype=torch.float32)
    x = inputs("linear", torch.float32)
    assert layer._fused_ok(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fused_ok(x)
        assert layer(x).dtype == torch.bfloat16  # the general path runs under autocast
    calls: list[str] = []
    h = layer.base.register_full_backward_hook(lambda *a: calls.append("backward"))
    assert not layer._fused_ok(x)
    layer(x).sum().backward()
    h.remove()
    h = nn.modules.module.register_module_forward_hook(lambda *a: calls.append("global"))
    try:
        assert not layer._fused_ok(x)
    finally:
        h.remove()
    assert layer._fused_ok(x) and calls[0] == "backward"


def test_weight_cache_follows_the_base_weight() -> None:
    layer = make("linear")
    x = inputs("linear")
    layer(x)
    with torch.no_grad():
        layer.base.weight.mul_(1.5)  # in place: a new version
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-12, rtol=0)
    layer.half().double()  # rounds W; the storage may land where the old one was
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-12, rtol=0)
    layer.base.weight = nn.Parameter(torch.randn(10, 12, dtype=D64), requires_grad=False)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_merge_unmerge_exact(kind: str) -> None:
    layer = make(kind, dead=True).eval()
    x = inputs(kind)
    w0 = layer.base.weight.detach().clone()
    y = layer(x).detach()
    v = dense_weight(layer.base) + layer.scaling * layer.lora_B @ layer.lora_A
    want = (layer.lora_magnitude_vector / torch.linalg.vector_norm(v, dim=1))[:, None] * v
    torch.testing.assert_close(layer.merged_weight(), want.detach(), atol=1e-13, rtol=0)
    layer.merge()
    torch.testing.assert_close(dense_weight(layer.base), want.detach(), atol=1e-13, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-13, rtol=0)
    dead = dense_weight(layer.base)[[0, 3]]
    assert torch.equal(dead, (w0 if kind == "linear" else w0.T)[[0, 3]])  # g = 0 rows verbatim
    torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=0)


def test_no_lora_export_and_registry() -> None:
    model = MODELS["llama"](0)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="merge_and_unload"):
        peftkit.export_lora(model, "/nonexistent/never-written")
    assert method_for_dict({"peft_type": "LORA", "use_dora": True}).name == "dora"
    assert method_for_dict({"peft_type": "LORA", "use_dora": False}).name == "lora"
    assert method_for_dict({"peft_type": "LORA"}).name == "lora"


# -- PEFT, the oracle for files and training ---------------------------------------------------
peft = pytest.importorskip("peft")

CASES: dict[str, dict[str, Any]] = {
    "llama": dict(
        kind="llama",
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
    ),
    "llama-embed": dict(
        kind="llama", target_modules=["k_proj", "embed_tokens"], r=2, lora_alpha=4, use_rslora=True
    ),
    "gpt2": dict(kind="gpt2", target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16),
}


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_peft(case: str, tmp_path: Any) -> None:
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    model = MODELS[kind](0)
    peftkit.adapt(model, peftkit.LoraConfig(use_dora=True, **kw)).eval()  # new layers train()
    _perturb(model, 1)
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    d = peftkit.read_adapter_config(tmp_path)
    assert d["peft_type"] == "LORA" and d["use_dora"] is True and "peftkit_method" not in d
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_peftkit(case: str, tmp_path: Any) -> None:
    from safetensors.torch import load_file

    kw = dict(CASES[case])
    kind = kw.pop("kind")
    theirs = peft.get_peft_model(MODELS[kind](0), peft.LoraConfig(use_dora=True, **kw))
    _perturb(theirs, 2)
    theirs.eval()
    x = ids(vocab=128)
    y = output(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    ours = peftkit.load_adapter(MODELS[kind](0), tmp_path)
    assert all(isinstance(a, DoraLayer) for _, a in peftkit.adapters(ours))
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)
    peftkit.merge(ours)
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_steps_match_peft(dropout: float, tmp_path: Any) -> None:
    # gradients equal PEFT's (norm detached; with dropout, the same masks drawn in the same
    # order): the same SGD trajectory
    kw: dict[str, Any] = dict(
        target_modules=["q_proj", "v_proj", "up_proj"],
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        lora_dropout=dropout,
    )
    theirs = peft.get_peft_model(MODELS["llama"](0), peft.LoraConfig(use_dora=True, **kw))
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.load_adapter(MODELS["llama"](0), tmp_path, trainable=True)
    x = ids(vocab=128, seq=12)
    models = (theirs.train(), ours.train())
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in models]
    for step in range(3):
        losses = []
        for m, opt in zip(models, opts, strict=True):
            torch.manual_seed(step)
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    torch.testing.assert_close(output(ours.eval(), x), output(theirs.eval(), x), atol=1e-5, rtol=0)


# -- NF4 bases (when peftkit.quant provides them) ----------------------------------------------
def _nf4() -> Any:
    import peftkit.quant as q

    if not (hasattr(q, "NF4Linear") and hasattr(q, "quantize_")):
        pytest.skip("peftkit.quant has no NF4Linear/quantize_ yet")
    return q


def test_nf4_base_matches_the_dequantised_formula() -> None:
    q = _nf4()
    model = MODELS["llama"](0)
    q.quantize_(model)
    peftkit.adapt(
        model,
        peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True),
    )
    layers = list(peftkit.adapters(model))
    assert layers and all(a.kind == "nf4" for _, a in layers)
    _perturb(model, 4)
    model.train()
    x = ids(vocab=128)
    for _, a in layers:
        h = torch.randn(2, 3, a.in_features)
        w = a.base.dequantize()
        v = w + a.scaling * a.lora_B @ a.lora_A
        g = a.lora_magnitude_vector / torch.linalg.vector_norm(v, dim=1).detach()
        ref = F.linear(h, g[:, None] * v) + (0 if a.base.bias is None else a.base.bias)
        torch.testing.assert_close(a(h), ref, atol=1e-5, rtol=1e-5)
    output(model, x).sum().backward()
    assert all(a.lora_magnitude_vector.grad is not None for _, a in layers)
    model.eval()
    y = output(model, x)
    merged = peftkit.merge_and_unload(model, probe=x)
    torch.testing.assert_close(output(merged, x), y, atol=1e-4, rtol=0)
