"""Encoder-decoder models (tiny T5 and BART) under ``peftkit.route``: each row of a mixed batch
equals a model with only that row's adapter active, in forward and in ``generate`` (greedy, beam
search, ``num_return_sequences``), token for token.

What differs from a decoder-only model: ``generate`` runs the encoder once on the prompts, through
``get_encoder()`` and not through the model, then calls the model with the encoder's output
repeated for the beams and ``decoder_input_ids`` alone; the cross-attention reads encoder rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODELS, ids
from test_contract import perturb
from test_multi_adapter import form  # noqa: F401  (the fixture: grouped and gathered forms)
from torch import nn

import peftkit

KINDS = ["t5", "bart"]
# q and v (self- and cross-attention, whose v reads the encoder's rows) per kind
QV = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}
# Every linear but the head (T5's wo included: its feed-forward reads ``self.wo.weight``, which
# an AdaptedLayer answers with its base's)
LINEAR: dict[str, str | list[str]] = {"t5": "all-linear", "bart": "all-linear"}
NAMES: list[str | None] = ["a", "b", None, "c"]


def three_adapters(kind: str, scale: float = 1.0) -> nn.Module:
    """``a``: LoRA r=4 on q and v; ``b``: LoRA r=2 on the linears; ``c``: DoRA r=2 on v; all
    with non-zero weights (``scale`` multiplies the LoRA Bs, so that tokens change)."""
    model = MODELS[kind](0)
    qv = QV[kind]
    peftkit.adapt(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=qv), name="a")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=LINEAR[kind]), name="b")
    peftkit.adapt(
        model, peftkit.LoraConfig(r=2, use_dora=True, target_modules=qv[1:]), name="c"
    )
    perturb(model)
    with torch.no_grad():
        for _, a in peftkit.adapters(model):
            a.lora_B.mul_(scale)
    return model.eval()


def solo(model: nn.Module, name: str | None, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with adapter ``name`` alone active (None: the base model)."""
    if name is None:
        with peftkit.disable_adapters(model):
            return fn()
    before = peftkit.active_adapters(model)
    peftkit.set_adapter(model, name)
    try:
        return fn()
    finally:
        peftkit.set_adapter(model, before)


def prompts() -> torch.Tensor:
    return ids(batch=4, seq=7, vocab=125, seed=1) + 3  # no pad, start or end token


def generate(model: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    # min_new_tokens: no row ends early, so a row alone and in the batch have the same length
    out: torch.Tensor = model.generate(x, max_new_tokens=5, min_new_tokens=5, **kw)
    return out


def each_alone(model: nn.Module, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``fn(rows)`` for each row of ``NAMES`` alone, with that row's adapter alone active."""
    return torch.cat(
        [solo(model, n, lambda r=slice(i, i + 1): fn(r)) for i, n in enumerate(NAMES)]
    )


def per_adapter_generate(model: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    return each_alone(model, lambda r: generate(model, x[r], **kw))


def per_adapter_logits(model: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return each_alone(model, lambda r: model(input_ids=x[r], decoder_input_ids=d[r]).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_rows_equal_each_rows_adapter(kind: str, form: str) -> None:  # noqa: F811
    model = three_adapters(kind)
    x, d = prompts(), ids(batch=4, seq=5, vocab=128, seed=2)
    with peftkit.route(model, NAMES):
        mixed = model(input_ids=x, decoder_input_ids=d).logits
    want = per_adapter_logits(model, x, d)
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):
        base = model(input_ids=x, decoder_input_ids=d).logits
    for i, n in enumerate(NAMES):  # the adapters do change their rows, so the test sees mix-ups
        assert (n is None) == torch.equal(mixed[i], base[i]), n


BEAMS = {"num_beams": 3}
BEAMS_NRS = {"num_beams": 2, "num_return_sequences": 2}
SAMPLE_NRS = {"do_sample": True, "top_k": 1, "num_return_sequences": 2}  # deterministic


@pytest.mark.parametrize(
    "kind,kw,form",
    [("t5", {}, "grouped"), ("t5", BEAMS_NRS, "gathered"), ("bart", BEAMS, "gathered"),
     ("bart", SAMPLE_NRS, "grouped")],
    ids=["t5-greedy", "t5-beams-nrs", "bart-beams", "bart-sample-nrs"],
    indirect=["form"],  # decoding steps take the grouped form unless told; both are checked
)
def test_mixed_generate_equals_per_adapter_generate(
    kind: str, kw: dict[str, Any], form: str  # noqa: F811
) -> None:
    model = three_adapters(kind, scale=20.0)
    x = prompts()
    with peftkit.route(model, NAMES):
        mixed = generate(model, x, **kw)
    want = per_adapter_generate(model, x, **kw)
    k = kw.get("num_return_sequences", 1)
    assert mixed.shape == want.shape == (4 * k, 6)  # the start token and 5 new ones
    assert torch.equal(mixed, want)
    assert len({tuple(r.tolist()) for r in want[::k]}) == 4  # the adapters differ here


@pytest.mark.parametrize("kind", KINDS)
def test_one_route_for_several_generates_and_forwards(kind: str) -> None:
    """One route, several calls, each equal to the same call in a route of its own (which the
    tests above compare with each adapter alone). The encoder of the second ``generate`` runs
    before the model is called, with the prompts' rows, while the route still holds the first
    one's repetition: the route watches the encoder too."""
    model = three_adapters(kind, scale=20.0)
    x, d = prompts(), ids(batch=4, seq=5, vocab=128, seed=2)
    calls: list[Callable[[], torch.Tensor]] = [
        lambda: generate(model, x, **BEAMS_NRS),
        lambda: generate(model, x),
        lambda: model(input_ids=x, decoder_input_ids=d).logits,
    ]
    with peftkit.route(model, NAMES):
        got = [call() for call in calls]
    for call, g in zip(calls, got, strict=True):
        with peftkit.route(model, NAMES):
            torch.testing.assert_close(g, call(), atol=0, rtol=0)
    encoder = model.get_encoder()
    assert not model._forward_pre_hooks and not encoder._forward_pre_hooks  # closed on exit


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_batches_are_still_refused(kind: str) -> None:
    model = three_adapters(kind)
    x, d = prompts(), ids(batch=4, seq=5, vocab=128, seed=2)
    with pytest.raises(ValueError, match="given 3 adapter names/ids.*4 rows"):
        with peftkit.route(model, ["a", "b", "c"]):
            model(input_ids=x, decoder_input_ids=d)
    # 4 different prompts for 2 names: not a repetition by generate
    with pytest.raises(ValueError, match="given 2 adapter names/ids.*4 rows"):
        with peftkit.route(model, ["a", "b"]):
            generate(model, x)
    # a decoding step: the decoder's first tokens are all the start token, but the encoder rows
    # they attend to differ, so 4 rows are no repetition of 2
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        h = model.get_encoder()(input_ids=x).last_hidden_state
    with pytest.raises(ValueError, match="given 2 adapter names/ids.*4 rows"):
        with peftkit.route(model, ["a", "b"]):
            model(encoder_outputs=(h,), decoder_input_ids=torch.full((4, 1), start))
    # per token: encoder and decoder positions differ, so it is refused by name
    for tok, packed in ((torch.zeros(4, 7, dtype=torch.long), False),
                        (torch.zeros(28, dtype=torch.long), True)):
        with pytest.raises(ValueError, match="per-token routing of an encoder-decoder"):
            with peftkit.route(model, tok, packed=packed):
                pass
    assert peftkit.core.model_state(model).route is None
