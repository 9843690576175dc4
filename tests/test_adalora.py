"""AdaLoRA against HF PEFT's AdaLoRA (the oracle): same masks and weights step by step from the
same weights and data, files both ways after pruning, export to plain LoRA; the hook under the HF
Trainer and a plain loop with accumulation; exact resume through the optimizer's state_dict."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, ids, output
from torch import nn

import peftkit
from peftkit.methods.adalora import AdaLoraLayer, RankAllocator, budget, rank_pattern, ranks

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# deltaT=2 exercises revival between masking events; tfinal=3 the fixed final phase.
SCHEDULE = dict(
    init_r=6,
    target_r=2,
    tinit=2,
    tfinal=3,
    deltaT=2,
    total_step=12,
    lora_alpha=8,
    orth_reg_weight=0.5,
)
STEPS = SCHEDULE["total_step"] + 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # Note: these models are tiny; on a loaded machine two OpenMP threads cost ~50x in barriers.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _copy_random_weights(ours: nn.Module, theirs: nn.Module, seed: int = 0) -> None:
    """The same non-trivial A, E, B in both models (E = 0 would leave A and B untouched by the
    task gradient at the first step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in peftkit.adapters(ours):
            their = theirs.base_model.model.get_submodule(name)
            for p in ("lora_A", "lora_E", "lora_B"):
                t = getattr(their, p)["default"]
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
                getattr(layer, p).copy_(t)


def _their_pattern(theirs: nn.Module) -> dict[str, list[bool]] | None:
    rp = theirs.peft_config["default"].rank_pattern
    return None if rp is None else {k.replace(".default", ""): v for k, v in rp.items()}


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """A PEFT and a peftkit AdaLoRA model trained in lockstep past the final allocation.

    Note: PEFT adds the orthogonality term inside ``AdaLoraModel.forward``, which a ``PeftModel``
    without ``task_type`` skips (it calls the base model directly): CAUSAL_LM is needed here."""
    theirs = peft.get_peft_model(
        MODELS["llama"](0),
        peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **SCHEDULE),
    )
    ours = peftkit.adapt(
        MODELS["llama"](0), peftkit.AdaLoraConfig(target_modules=TARGETS, **SCHEDULE)
    )
    _copy_random_weights(ours, theirs)
    theirs.train()
    ours.train()
    opt_t = torch.optim.AdamW(
        [p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    opt_o = torch.optim.AdamW(
        [p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    peftkit.attach(opt_o, ours)
    records = []
    for t in range(STEPS):
        x = ids(batch=4, seq=8, vocab=128, seed=100 + t)
        theirs(input_ids=x, labels=x).loss.backward()  # task loss + orthogonality term
        opt_t.step()
        theirs.base_model.update_and_allocate(t)  # PEFT's documented loop: after step, t from 0
        opt_t.zero_grad()
        ours(input_ids=x, labels=x).loss.backward()  # the task loss only
        opt_o.step()
        opt_o.zero_grad()
        diff = 0.0
        for name, layer in peftkit.adapters(ours):
            their = theirs.base_model.model.get_submodule(name)
            for p in ("lora_A", "lora_E", "lora_B"):
                d = (getattr(their, p)["default"] - getattr(layer, p)).abs().max().item()
                diff = max(diff, d)
        nonzero = {
            name: (
                int((theirs.base_model.model.get_submodule(name).lora_E["default"] != 0).sum()),
                int((layer.lora_E != 0).sum()),
            )
            for name, layer in peftkit.adapters(ours)
        }
        records.append(
            dict(theirs=_their_pattern(theirs), ours=rank_pattern(ours), diff=diff, nonzero=nonzero)
        )
    theirs.eval()
    ours.eval()
    return dict(theirs=theirs, ours=ours, records=records)


def test_masks_and_weights_match_peft_step_by_step(trained: dict[str, Any]) -> None:
    records = trained["records"]
    for t, rec in enumerate(records):
        assert rec["ours"] == rec["theirs"], f"masks differ after step {t}"
        assert rec["diff"] < 1e-5, f"weights differ by {rec['diff']:.2e} after step {t}"
        for name, (n_theirs, n_ours) in rec["nonzero"].items():
            assert n_theirs == n_ours, f"nonzero E of {name} differ after step {t}"
    assert records[SCHEDULE["tinit"]]["ours"] is None  # no allocation before t_init
    # revival: on a non-masking step of the budget phase every E is nonzero again
    assert all(n == SCHEDULE["init_r"] for n, _ in records[5]["nonzero"].values())
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    kept = sum(ranks(trained["ours"]).values())
    assert kept <= SCHEDULE["target_r"] * len(ranks(trained["ours"]))
    for t in range(final, STEPS):  # the final allocation holds
        assert records[t]["ours"] == records[final]["ours"]
        assert all(
            n == sum(records[final]["ours"][f"{k}.lora_E"])
            for k, (n, _) in records[t]["nonzero"].items()
        )


def test_budget_schedule_matches_peft(trained: dict[str, Any]) -> None:
    alloc = trained["theirs"].base_model.rankallocator
    for t in range(SCHEDULE["total_step"] + 3):
        assert (
            budget(
                t,
                init_bgt=alloc.init_bgt,
                target_bgt=alloc.target_bgt,
                tinit=SCHEDULE["tinit"],
                tfinal=SCHEDULE["tfinal"],
                total_step=SCHEDULE["total_step"],
            )
            == alloc.budget_schedule(t)[0]
        )


def test_orthogonality_gradient_is_that_of_the_regulariser() -> None:
    model = MODELS["mlp"](0)
    cfg = peftkit.AdaLoraConfig(
        target_modules=["fc1", "fc2"], init_r=3, target_r=2, total_step=10, orth_reg_weight=0.7
    )
    peftkit.adapt(model, cfg)
    layers = [a for _, a in peftkit.adapters(model)]
    # R = w / (2n) Σ (‖AAᵀ − I‖_F + ‖BᵀB − I‖_F), differentiated by autograd
    reg = sum(
        torch.linalg.matrix_norm(a.lora_A @ a.lora_A.T - torch.eye(3))
        + torch.linalg.matrix_norm(a.lora_B.T @ a.lora_B - torch.eye(3))
        for a in layers
    )
    grads = torch.autograd.grad(
        0.7 * reg / (2 * len(layers)), [p for a in layers for p in (a.lora_A, a.lora_B)]
    )
    hook = next(h for h in peftkit.core.get_state(model).hooks if isinstance(h, RankAllocator))
    hook.before_step()
    got = [p.grad for a in layers for p in (a.lora_A, a.lora_B)]
    for g, want in zip(got, grads, strict=True):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
    assert all(a.lora_E.grad is None for a in layers)


def test_peftkit_file_loads_in_peft_after_pruning(trained: dict[str, Any], tmp_path: Any) -> None:
    ours = trained["ours"]
    x = ids(vocab=128, seed=7)
    y = output(ours, x)
    peftkit.save_adapter(ours, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "ADALORA" and d["rank_pattern"] == rank_pattern(ours)
    assert len(set(ranks(ours).values())) > 1  # per-layer ranks differ
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, k in ranks(ours).items():
        assert tensors[f"base_model.model.{name}.lora_A"].shape == (
            k,
            32 if "down" not in name else 64,
        )
        assert tensors[f"base_model.model.{name}.lora_E"].shape == (k, 1)
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    again = peftkit.load_adapter(MODELS["llama"](0), tmp_path)
    torch.testing.assert_close(output(again, x), y, atol=1e-5, rtol=0)
    assert ranks(again) == ranks(ours)


def test_peft_file_loads_in_peftkit_after_pruning(trained: dict[str, Any], tmp_path: Any) -> None:
    theirs = trained["theirs"]
    x = ids(vocab=128, seed=8)
    y = output(theirs, x)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.load_adapter(MODELS["llama"](0), tmp_path / "peft")
    torch.testing.assert_close(output(ours, x), y, atol=1e-5, rtol=0)
    pattern = _their_pattern(theirs)
    assert pattern is not None
    assert ranks(ours) == {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items()}
    # re-saved by peftkit: the same file content (allocation already ran in the run that wrote it)
    peftkit.save_adapter(ours, tmp_path / "again")
    d = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert d["rank_pattern"] == pattern
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_lora_loads_in_peft(trained: dict[str, Any], tmp_path: Any) -> None:
    ours = trained["ours"]
    x = ids(vocab=128, seed=9)
    y = output(ours, x)
    peftkit.export_lora(ours, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["rank_pattern"]  # per-module ranks differ
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    back = peftkit.load_adapter(MODELS["llama"](0), tmp_path)
    torch.testing.assert_close(output(back, x), y, atol=1e-5, rtol=0)


def test_conv1d_with_a_given_rank_pattern_roundtrips_with_peft(tmp_path: Any) -> None:
    pattern = {
        "transformer.h.0.attn.c_attn.lora_E": [True, False, True, False],
        "transformer.h.1.attn.c_attn.lora_E": [False] * 4,
    }
    model = peftkit.adapt(
        MODELS["gpt2"](0),
        peftkit.AdaLoraConfig(
            target_modules=["c_attn"],
            init_r=4,
            target_r=1,
            total_step=10,
            rank_pattern=pattern,
            init_lora_weights=False,
        ),
    )
    assert ranks(model) == {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.attn.c_attn": 0}
    x = ids(vocab=128)
    y = output(model, x)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS["gpt2"](0), str(tmp_path)).eval()
    torch.testing.assert_close(output(theirs, x), y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank_pattern keys"):
        peftkit.adapt(
            MODELS["gpt2"](0),
            peftkit.AdaLoraConfig(
                target_modules=["c_attn"],
                init_r=4,
                total_step=10,
                target_r=1,
                rank_pattern={"nope.lora_E": [True] * 4},
            ),
        )


def test_saving_before_allocation_says_how_to_attach(tmp_path: Any) -> None:
    model = peftkit.adapt(
        MODELS["mlp"](0),
        peftkit.AdaLoraConfig(
            target_modules=["fc1", "fc2"], init_r=4, target_r=2, total_step=10, tinit=3
        ),
    )
    output(model, ids()).sum().backward()
    with pytest.raises(ValueError, match=r"peftkit\.attach\(optimizer, model\).*PeftkitCallback"):
        peftkit.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peftkit.attach(opt, model)
    opt.step()  # one real step, still in t_init: full tensors and no rank_pattern, as PEFT
    peftkit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    with pytest.raises(TypeError, match="nn.Embedding"):
        peftkit.adapt(
            MODELS["mlp"](0), peftkit.AdaLoraConfig(target_modules=["embed"], total_step=10)
        )


def test_config_validation_follows_peft() -> None:
    ok = dict(target_modules=["fc1"], total_step=10)
    with pytest.raises(ValueError, match="total_step"):
        peftkit.AdaLoraConfig(target_modules=["fc1"])
    with pytest.raises(ValueError, match="tinit"):
        peftkit.AdaLoraConfig(**ok, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="use_dora"):
        peftkit.AdaLoraConfig.from_dict({"peft_type": "ADALORA", **ok, "use_dora": True})
    with pytest.warns(UserWarning, match="init_r"):
        peftkit.AdaLoraConfig(**ok, r=16)
    mine = peftkit.AdaLoraConfig(**ok)
    theirs = peft.AdaLoraConfig(**ok)
    for f in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "lora_alpha",
        "lora_dropout",
    ):
        assert getattr(mine, f) == getattr(theirs, f), f


# -- the hook under a plain loop with accumulation, the HF Trainer, and a resumed run ---------


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))  # (B, 1)
        return {"loss": F.mse_loss(h.squeeze(-1), labels)}


HOOK_CFG = dict(
    target_modules=["fc1", "fc2"],
    init_r=4,
    target_r=2,
    tinit=1,
    tfinal=2,
    deltaT=1,
    total_step=6,
    lora_alpha=8,
    init_lora_weights=False,
)


def _samples(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _adapted(**kw: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = peftkit.adapt(Regressor(), peftkit.AdaLoraConfig(**{**HOOK_CFG, **kw}))
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0
    )
    return model, opt


def _run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[dict[str, torch.Tensor]],
    steps: range,
    accum: int = 2,
    batch: int = 4,
) -> None:
    for step in steps:
        for micro in range(accum):
            rows = data[(step * accum + micro) * batch : (step * accum + micro + 1) * batch]
            xb = torch.stack([r["x"] for r in rows])
            yb = torch.stack([r["labels"] for r in rows])
            (model(xb, yb)["loss"] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.detach().clone()
        for n, a in peftkit.adapters(model)
        for k, v in [("A", a.lora_A), ("E", a.lora_E), ("B", a.lora_B), ("mask", a.rank_mask)]
    }


def test_trainer_and_plain_loop_with_accumulation_give_the_same_masks(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from peftkit.integrations.hf import PeftkitCallback

    steps = HOOK_CFG["total_step"]
    data = _samples(steps * 2 * 4)
    plain, opt = _adapted()
    peftkit.attach(opt, plain)
    _run(plain, opt, data, range(steps))

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(data)

    model, opt2 = _adapted()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=steps,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Stream(),
        optimizers=(opt2, None),
        callbacks=[PeftkitCallback()],
    )
    trainer.train()
    assert rank_pattern(model) is not None
    assert rank_pattern(model) == rank_pattern(plain)
    assert ranks(model) == ranks(plain)
    a, b = _adapter_state(model), _adapter_state(plain)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_resume_through_the_optimizer_state_dict_is_exact() -> None:
    data = _samples(8 * 2 * 4)
    cfg = dict(total_step=8, deltaT=2)
    model, opt = _adapted(**cfg)
    peftkit.attach(opt, model)
    _run(model, opt, data, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert opt.state_dict()["peftkit_hooks"][0]["step"] == 3
    _run(model, opt, data, range(3, 8))
    want = _adapter_state(model)

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed, opt2 = _adapted(**cfg)
    resumed.load_state_dict(ckpt["model"])
    peftkit.attach(opt2, resumed)
    opt2.load_state_dict(ckpt["opt"])
    _run(resumed, opt2, data, range(3, 8))
    got = _adapter_state(resumed)
    assert rank_pattern(resumed) is not None
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert isinstance(next(iter(peftkit.adapters(resumed)))[1], AdaLoraLayer)
