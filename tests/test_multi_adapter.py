"""Many adapters on one model: names, several active adapters, mixed-adapter batches
(``peftkit.route``) in forward, training and ``generate``, and PEFT's multi-adapter folders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, tiny_bert, tiny_llama
from test_contract import METHODS, ROWS, TARGETS, perturb
from torch import nn

import peftkit
from peftkit.core import AdaptedLayer

MIXABLE = [m for m in METHODS if m != "delta_lora"]


@pytest.fixture(params=["grouped", "gathered"])
def form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through both stacked forms: positions grouped by adapter (decoding steps,
    per-token routes) and each row's factors gathered (per-row routes of many positions)."""
    from peftkit import routing

    monkeypatch.setattr(
        routing, "GATHER_MIN_POSITIONS", 10**9 if request.param == "grouped" else 0
    )
    return str(request.param)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def two_adapters(method: str, kind: str = "llama", seed: int = 0) -> nn.Module:
    """``a``: the method under test on the kind's targets; ``b``: a rank-2 LoRA on two of them
    (ranks differ); ``c``: rsLoRA on one; all with non-zero weights."""
    model = MODELS[kind](seed)
    linear, _, _ = TARGETS[kind]
    peftkit.adapt(model, ROWS[method].make(target_modules=linear), name="a")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=linear[:2]), name="b")
    peftkit.adapt(
        model, peftkit.LoraConfig(r=8, use_rslora=True, target_modules=linear[1:2]), name="c"
    )
    perturb(model, seed)
    return model.eval()


def reference_rows(model: nn.Module, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each row alone, through a model holding only that row's adapter active."""
    rows = []
    before = peftkit.active_adapters(model)
    for i, n in enumerate(names):
        if n is None:
            with peftkit.disable_adapters(model):
                rows.append(logits(model, x[i : i + 1]))
        else:
            peftkit.set_adapter(model, n)
            rows.append(logits(model, x[i : i + 1]))
    peftkit.set_adapter(model, before)
    return torch.cat(rows)


# ---------------------------------------------------------------- names and activation


def test_named_adapters_lifecycle() -> None:
    model = tiny_llama()
    x = ids(vocab=128)
    base = logits(model, x)
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["v_proj"]), name="other")
    assert peftkit.adapter_names(model) == ["default", "other"]
    assert peftkit.active_adapters(model) == ["default"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLayer)
    # a new adapter is trainable but not active
    other = [a for _, a in peftkit.adapters(model, "other")]
    assert other and all(a.lora_A.requires_grad for a in other)
    perturb(model)
    only_default = logits(model, x)
    peftkit.set_adapter(model, "other")
    only_other = logits(model, x)
    peftkit.set_adapter(model, ["default", "other"])
    both = logits(model, x)
    # several active adapters add their updates (the layers are disjoint here, and also check
    # one layer with two: below)
    assert not torch.allclose(only_default, only_other)
    assert not torch.allclose(both, only_default)
    with pytest.raises(ValueError, match="already has an adapter named 'other'"):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["q_proj"]), name="other")
    for bad in ("", "../x", "a/b", "__base__", ".hidden"):
        with pytest.raises(ValueError, match="not usable"):
            peftkit.adapt(model, peftkit.LoraConfig(target_modules=["q_proj"]), name=bad)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'.*\['default', 'other'\]"):
        peftkit.set_adapter(model, "nope")
    peftkit.delete_adapter(model, "default")
    assert peftkit.adapter_names(model) == ["other"]
    assert peftkit.active_adapters(model) == ["other"]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.Linear)  # the layer lost its only adapter: the plain base is back
    torch.testing.assert_close(logits(model, x), only_other, atol=1e-6, rtol=0)
    peftkit.delete_adapter(model, "other")
    assert peftkit.adapter_names(model) == []
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_two_active_adapters_on_one_layer_add() -> None:
    model = tiny_llama()
    for n in ("a", "b"):
        peftkit.adapt(model, peftkit.LoraConfig(r=3, target_modules=["q_proj"]), name=n)
    perturb(model)
    peftkit.set_adapter(model, ["a", "b"])
    q = model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 5, 32)
    da, db = (q.adapters[n].delta_weight() for n in ("a", "b"))
    expected = h @ (q.base.weight + da + db).T
    torch.testing.assert_close(q(h), expected, atol=1e-5, rtol=0)
    peftkit.merge(model, "a")
    torch.testing.assert_close(q(h), expected, atol=1e-5, rtol=0)
    peftkit.unmerge(model, "a")
    torch.testing.assert_close(q(h), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- mixed batches in forward


@pytest.mark.parametrize("method", MIXABLE)
def test_mixed_rows_equal_single_adapter_outputs(method: str, form: str) -> None:
    model = two_adapters(method)
    x = ids(batch=5, vocab=128)
    names = ["a", "b", None, "c", "a"]
    with peftkit.route(model, names):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, reference_rows(model, x, names), atol=1e-5, rtol=0)
    # integer ids (−1 = base) give the same
    with peftkit.route(model, torch.tensor([0, 1, -1, 2, 0])):
        torch.testing.assert_close(logits(model, x), mixed, atol=0, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_rank_groups_are_stacked_apart_and_stay_exact(dora: bool, form: str) -> None:
    """Ranks 2, 3, 16, 64: {2, 3}, {16} and {64} are stacked apart (no padding of the small
    ones to 64), and each row still equals its adapter alone."""
    from peftkit import routing

    model = MODELS["llama"](0)
    linear, _, _ = TARGETS["llama"]
    for name, r in [("r2", 2), ("r3", 3), ("r16", 16), ("r64", 64)]:
        cfg = peftkit.LoraConfig(r=r, lora_alpha=r, target_modules=linear, use_dora=dora)
        peftkit.adapt(model, cfg, name=name)
    perturb(model, 0)
    model.eval()
    x = ids(batch=6, vocab=128)
    names = ["r64", "r2", None, "r16", "r3", "r2"]
    with torch.no_grad():
        with peftkit.route(model, names):
            mixed = logits(model, x)
            layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer))
            open_route = model.peftkit_state.route
            st = routing._stack(layer, list(layer.adapters.values()), [0, 1, 2, 3], open_route)
    assert st is not None and [p.members for p in st.parts] == [[0, 1], [2], [3]]
    torch.testing.assert_close(mixed, reference_rows(model, x, names), atol=1e-5, rtol=0)


def sorted_rows() -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A tiny Llama with LoRAs ``a`` and ``b`` (non-zero) on every linear, in eval mode, and 4
    rows in adapter order, 2 each (what a server keeps)."""
    model = tiny_llama()
    linear, _, _ = TARGETS["llama"]
    for name in ("a", "b"):
        peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=linear), name=name)
    perturb(model, 3)
    return model.eval(), ids(batch=4, vocab=128, seed=2), ["a", "a", "b", "b"]


@pytest.mark.parametrize("grad", [False, True])
def test_rows_already_grouped_by_adapter(grad: bool, form: str) -> None:
    """Rows sorted by adapter in equal groups (what a server keeps) take views, not copies, in
    the grouped form: outputs and gradients still equal each adapter alone."""
    model, x, names = sorted_rows()
    ref = copy.deepcopy(model)
    with torch.set_grad_enabled(grad):
        with peftkit.route(model, names):
            out = logits(model, x)
        want = reference_rows(ref, x, names)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        if grad:
            (out.float() ** 2).sum().backward()
            (want.float() ** 2).sum().backward()
            pairs = zip(model.named_parameters(), ref.named_parameters(), strict=True)
            for (k, p), (_, q) in pairs:
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_frozen_route_repeats_of_one_shape_take_the_views_plan() -> None:
    """A frozen route's second forward of the same shape with rows grouped in order (a server's
    decoding steps) takes the short :class:`routing._Views` plan: still each row's own adapter;
    a hook put on a base mid-route sends that layer back to the full plan (its output kept)."""
    from peftkit import routing

    model, x, names = sorted_rows()
    want = reference_rows(copy.deepcopy(model), x, names)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer))
    with torch.no_grad(), peftkit.route(model, names, frozen=True):
        first = logits(model, x)
        plans = model.peftkit_state.route._layer_plans.values()
        assert any(isinstance(p, routing._Views) for p in plans)
        second = logits(model, x)
        seen: list[torch.Tensor] = []  # copies of the base's output
        held: list[torch.Tensor] = []  # the base's output tensor itself
        handle = layer.base.register_forward_hook(lambda _m, _i, o: seen.append(o.clone()))
        kept = layer.base.register_forward_hook(lambda _m, _i, o: held.append(o))
        third = logits(model, x)
        handle.remove()
        kept.remove()
    for got in (first, second, third):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(held[0], seen[0], atol=0, rtol=0)  # not added to in place


def test_weights_edited_in_place_are_seen_at_the_next_forward_or_frozen_route() -> None:
    """A route re-checks its cached stacks against the weights at every forward; a frozen one
    (a server's loop) once per route."""
    model = two_adapters("lora")
    x = ids(batch=3, vocab=128)
    names = ["a", "b", "c"]
    with torch.no_grad():
        with peftkit.route(model, names):
            before = logits(model, x)
            for _, a in peftkit.adapters(model, "b"):
                a.lora_B.mul_(3.0)
            after = logits(model, x)
        assert not torch.equal(after[1], before[1])
        torch.testing.assert_close(after, reference_rows(model, x, names), atol=1e-5, rtol=0)
        with peftkit.route(model, names, frozen=True):
            first = logits(model, x)
            for _, a in peftkit.adapters(model, "b"):
                a.lora_B.mul_(3.0)
            torch.testing.assert_close(logits(model, x), first, atol=0, rtol=0)  # not seen
        with peftkit.route(model, names, frozen=True):
            again = logits(model, x)
        assert not torch.equal(again[1], first[1])  # seen by the next route
        torch.testing.assert_close(again, reference_rows(model, x, names), atol=1e-5, rtol=0)


def test_a_hook_on_a_base_layer_sees_the_base_output(form: str) -> None:
    """Inference adds the updates onto the base's output in place, except where a forward hook
    on the base may have kept that tensor: the hook's copy stays the base's output."""
    model = two_adapters("lora")
    x = ids(batch=3, vocab=128)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer))
    seen: list[torch.Tensor] = []
    handle = layer.base.register_forward_hook(lambda _m, _i, o: seen.append(o))
    inputs: list[torch.Tensor] = []
    grab = layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad(), peftkit.route(model, ["a", "b", "c"]):
        logits(model, x)
    handle.remove()
    grab.remove()
    torch.testing.assert_close(seen[0], layer.base(inputs[0]), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "mora", "adalora"])
def test_mixed_rows_on_an_nf4_base(method: str, form: str) -> None:
    if not ROWS[method].nf4:
        pytest.skip("method refuses NF4 bases")
    model = two_adapters(method, kind="nf4")
    x = ids(batch=4, vocab=128)
    names = ["b", "a", "c", None]
    with peftkit.route(model, names):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, reference_rows(model, x, names), atol=1e-5, rtol=0)


class TokenModel(nn.Module):
    """No mixing across tokens, so each token's output depends on its own adapter only."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def token_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TokenModel().eval()


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "mora", "dylora", "adalora"])
def test_per_token_and_packed_routing(method: str, form: str) -> None:
    model = token_model()
    row = ROWS[method]
    peftkit.adapt(model, row.make(target_modules=["up", "down"]), name="a")
    peftkit.adapt(model, peftkit.LoraConfig(r=3, target_modules=["up"]), name="b")
    perturb(model)
    x = torch.randn(3, 7, 16)
    tok = torch.randint(-1, 2, (3, 7), generator=torch.Generator().manual_seed(0))
    each = {}
    for i, n in ((0, "a"), (1, "b")):
        peftkit.set_adapter(model, n)
        each[i] = model(x)
    with peftkit.disable_adapters(model):
        each[-1] = model(x)
    expected = torch.stack([each[int(t)][r, c] for r, c, t in _cells(tok)]).view(3, 7, 8)
    with peftkit.route(model, tok):
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    # the same tokens packed into one sequence (continuous batching's layout)
    with peftkit.route(model, tok.reshape(-1), packed=True):
        got = model(x.reshape(1, 21, 16))
    torch.testing.assert_close(got.view(3, 7, 8), expected, atol=1e-5, rtol=0)


def _cells(tok: torch.Tensor) -> list[tuple[int, int, int]]:
    return [(r, c, int(tok[r, c])) for r in range(tok.shape[0]) for c in range(tok.shape[1])]


def test_modules_to_save_route_per_row() -> None:
    model = tiny_bert()
    cfg = peftkit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    peftkit.adapt(model, cfg, name="a")
    peftkit.adapt(model, cfg, name="b")
    perturb(model)
    x = ids(batch=3, vocab=128)
    names = ["b", None, "a"]
    with peftkit.route(model, names):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, reference_rows(model, x, names), atol=1e-5, rtol=0)


def test_bad_routes_are_refused_by_name() -> None:
    model = two_adapters("lora")
    x = ids(batch=3, vocab=128)
    with pytest.raises(ValueError, match=r"row 1: no adapter named 'bb'.*\['a', 'b', 'c'\]"):
        with peftkit.route(model, ["a", "bb", None]):
            pass
    with pytest.raises(ValueError, match="given 2 adapter names/ids.*3 rows"):
        with peftkit.route(model, ["a", "b"]):
            model(x)
    with pytest.raises(ValueError, match="out of range"):
        with peftkit.route(model, torch.tensor([0, 5, -1])):
            pass
    with pytest.raises(TypeError, match="one adapter name per row"):
        with peftkit.route(model, "a"):
            pass
    peftkit.merge(model, "b")
    with pytest.raises(ValueError, match="'b' is merged.*unmerge"):
        with peftkit.route(model, ["a", "b", None]):
            pass
    peftkit.unmerge(model, "b")
    with peftkit.route(model, ["a", "b", None]):
        with pytest.raises(ValueError, match="do not nest"):
            with peftkit.route(model, ["a", "b", None]):
                pass
    assert peftkit.core.model_state(model).route is None  # closed on the way out


def test_delta_lora_is_refused_with_its_way_out() -> None:
    model = tiny_llama()
    peftkit.adapt(model, peftkit.DeltaLoraConfig(r=2, target_modules=["q_proj"]), name="d")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["v_proj"]), name="l")
    with pytest.raises(ValueError, match="Delta-LoRA.*export_lora"):
        with peftkit.route(model, ["d", "l"]):
            pass
    with pytest.raises(ValueError, match="Delta-LoRA.*cannot share a layer"):
        peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]), name="x")


# ---------------------------------------------------------------- generate


def _generate(model: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    kw.setdefault("max_new_tokens", 6)
    out: torch.Tensor = model.generate(x, pad_token_id=0, **kw)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},  # greedy
        {"num_beams": 3},
        {"num_beams": 2, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 1, "num_return_sequences": 2},  # sampling, deterministic
    ],
    ids=["greedy", "beams", "beams-nrs", "sample-nrs"],
)
def test_mixed_generate_equals_per_adapter_generate(kw: dict[str, Any], form: str) -> None:
    model = two_adapters("lora")
    with torch.no_grad():  # larger updates, so that adapters really change the tokens
        for _, a in peftkit.adapters(model):
            a.lora_B.mul_(20)
    x = ids(batch=4, seq=5, vocab=128, seed=3)
    names = ["a", "c", None, "b"]
    with peftkit.route(model, names):
        mixed = _generate(model, x, **kw)
    k = kw.get("num_return_sequences", 1)
    expected = []
    for i, n in enumerate(names):
        if n is None:
            with peftkit.disable_adapters(model):
                expected.append(_generate(model, x[i : i + 1], **kw))
        else:
            peftkit.set_adapter(model, n)
            expected.append(_generate(model, x[i : i + 1], **kw))
    expected_t = torch.cat(expected)
    assert mixed.shape == expected_t.shape == (4 * k, 11)
    assert torch.equal(mixed, expected_t)
    # and the adapters do differ here, so the test sees routing mistakes
    assert len({tuple(r.tolist()) for r in expected_t[:: k]}) > 1


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "mora", "lora_fa", "adalora"])
def test_mixed_training_gradients_equal_separate_runs(method: str, form: str) -> None:
    model = two_adapters(method).train()
    ref = copy.deepcopy(model)
    x = ids(batch=4, vocab=128, seed=5)
    names = ["a", "b", "a", "c"]

    def loss(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return (logits(m, rows).float() ** 2).sum()

    with peftkit.route(model, names):
        loss(model, x).backward()
    for n in ("a", "b", "c"):
        peftkit.set_adapter(ref, n)
        rows = [i for i, m in enumerate(names) if m == n]
        loss(ref, x[rows]).backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    want = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for k in got:
        if want[k] is None:
            assert got[k] is None or not got[k].any(), k
            continue
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- files


def test_multi_adapter_folder_round_trips_and_peft_reads_it(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peftkit.adapt(model, peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]), name="b")
    perturb(model)
    x = ids(vocab=128)
    outs = {}
    for n in ("default", "b"):
        peftkit.set_adapter(model, n)
        outs[n] = logits(model, x)
    peftkit.save_adapter(model, tmp_path / "both")
    assert (tmp_path / "both" / "adapter_config.json").is_file()
    assert (tmp_path / "both" / "b" / "adapter_model.safetensors").is_file()

    fresh = tiny_llama()
    peftkit.load_adapter(fresh, tmp_path / "both")
    assert peftkit.adapter_names(fresh) == ["default", "b"]
    for n in ("default", "b"):
        peftkit.set_adapter(fresh, n)
        torch.testing.assert_close(logits(fresh, x), outs[n], atol=0, rtol=0)

    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "both"))
    pm.load_adapter(str(tmp_path / "both" / "b"), adapter_name="b")
    for n in ("default", "b"):
        pm.set_adapter(n)
        torch.testing.assert_close(pm(x).logits, outs[n], atol=1e-5, rtol=0)

    # and a folder PEFT wrote with several adapters loads here
    pm.save_pretrained(str(tmp_path / "peft"))
    mine = tiny_llama()
    peftkit.load_adapter(mine, tmp_path / "peft")
    assert sorted(peftkit.adapter_names(mine)) == ["b", "default"]
    for n in ("default", "b"):
        peftkit.set_adapter(mine, n)
        torch.testing.assert_close(logits(mine, x), outs[n], atol=1e-5, rtol=0)


def test_load_into_an_adapted_model_and_failures_leave_it_as_it_was(tmp_path: Path) -> None:
    model = tiny_llama()
    peftkit.adapt(model, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(model)
    peftkit.save_adapter(model, tmp_path / "one")
    other = tiny_llama()
    peftkit.adapt(other, peftkit.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peftkit.load_adapter(other, tmp_path / "one", name="lora", trainable=True)
    assert peftkit.adapter_names(other) == ["default", "lora"]
    assert all(a.lora_A.requires_grad for _, a in peftkit.adapters(other, "lora"))
    x = ids(vocab=128)
    peftkit.set_adapter(other, "lora")
    torch.testing.assert_close(logits(other, x), logits(model, x), atol=0, rtol=0)
    # a folder whose tensors do not fit is refused, and the model keeps what it had
    bad = tmp_path / "bad"
    peftkit.adapt(tiny := tiny_llama(), peftkit.LoraConfig(r=3, target_modules=["q_proj"]))
    peftkit.save_adapter(tiny, bad)
    (bad / "adapter_config.json").write_text(
        (bad / "adapter_config.json").read_text().replace('"r": 3', '"r": 5')
    )
    with pytest.raises(ValueError, match="wrong shape"):
        peftkit.load_adapter(other, bad, name="bad")
    assert peftkit.adapter_names(other) == ["default", "lora"]


def test_save_one_named_adapter_and_export_it(tmp_path: Path) -> None:
    model = two_adapters("lora")
    x = ids(vocab=128)
    peftkit.set_adapter(model, "b")
    want = logits(model, x)
    peftkit.save_adapter(model, tmp_path / "b", name="b")
    peftkit.export_lora(model, tmp_path / "b-plain", name="b")
    for folder in ("b", "b-plain"):
        fresh = tiny_llama()
        peftkit.load_adapter(fresh, tmp_path / folder)
        torch.testing.assert_close(logits(fresh, x), want, atol=1e-5, rtol=0)
    merged = peftkit.merge_and_unload(model, name="c", probe=x)
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())


# ---------------------------------------------------------------- the contract, two adapters


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "adalora"])
def test_contract_with_two_adapters(method: str, tmp_path: Path) -> None:
    base = tiny_llama()
    model = two_adapters(method)
    x = ids(vocab=128)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=0, rtol=0)
    peftkit.set_adapter(model, ["a", "b"])
    both = logits(model, x)
    peftkit.merge(model)
    torch.testing.assert_close(logits(model, x), both, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        peftkit.merge(model)
    peftkit.unmerge(model)
    torch.testing.assert_close(logits(model, x), both, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=0)
    peftkit.save_adapter(model, tmp_path / "m")
    fresh = tiny_llama()
    peftkit.load_adapter(fresh, tmp_path / "m", name=None)
    assert set(peftkit.adapter_names(fresh)) == {"a", "b", "c"}
    for n in ("a", "b", "c"):
        peftkit.set_adapter(model, n)
        peftkit.set_adapter(fresh, n)
        torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=1e-6, rtol=0)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in k for k in trainable)


# ---------------------------------------------------------------- hooks and checkpoints


def _tasks_model() -> nn.Module:
    model = tiny_llama().train()
    ada = peftkit.AdaLoraConfig(
        init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1, deltaT=1,
        target_modules=["q_proj", "v_proj"],
    )
    peftkit.adapt(model, ada, name="ada")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), name="lora")
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = ids(batch=4, vocab=128, seed=100 + step)
        with peftkit.route(model, ["ada", "lora", "ada", "lora"]):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_hooks_act_on_their_own_adapter_and_checkpoints_keep_every_adapter(
    tmp_path: Path,
) -> None:
    from peftkit.checkpoint import load_checkpoint, save_checkpoint
    from peftkit.methods import adalora

    torch.manual_seed(0)
    model = _tasks_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, model)
    _train(model, opt, range(3))
    with peftkit.core.focused(model, "ada"):
        pruned = adalora.ranks(model)
    assert pruned and all(r <= 4 for r in pruned.values())
    assert any(r < 4 for r in pruned.values())  # the budget acted on AdaLoRA's layers ...
    assert all(a.r == 2 for _, a in peftkit.adapters(model, "lora"))  # ... and only on them
    save_checkpoint(tmp_path / "ck", 3, model=model, optimizer=opt, trainer_state={})
    _train(model, opt, range(3, 6))
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    again = _tasks_model()
    opt2 = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(tmp_path / "ck" / "step-00000003", model=again, optimizer=opt2)
    _train(again, opt2, range(3, 6))
    got = again.state_dict()
    assert got.keys() == want.keys()
    assert any(".adapters.lora." in k for k in got) and any(".adapters.ada." in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
