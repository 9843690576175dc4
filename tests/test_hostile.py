"""Hostile and broken inputs: fuzzed configs, damaged adapter files, foreign folders.

Every failure is a one-line ValueError, TypeError, FileNotFoundError or NotADirectoryError that
names the file (for files) and the problem, never an exception from deep inside; a failed load
leaves the model unadapted; loading never unpickles anything. (A failed *save* keeping the previous
adapter is tested in tests/test_targets_and_files.py.)
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODELS, ids, output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.config import RUN_ONLY_FIELDS, _is_default_like
from peftkit.core import Adapter

TARGETS = ["fc1", "fc2"]
# Valid settings for the tiny MLP, where a method's defaults alone are not a valid config.
VALID: dict[str, dict[str, Any]] = {
    "lora": {"r": 2},
    "dora": {"r": 2, "use_dora": True},
    "vera": {"r": 4},
    "mora": {"r": 4},
    "dylora": {"r": 2},
    "dora_dynamic": {"target_r": 2, "init_r": 4, "total_step": 8, "prune_interval": 2},
    "adalora": {"init_r": 4, "target_r": 4, "total_step": 8},
    "lora_fa": {"r": 2},
    "delta_lora": {"r": 2, "warmup_steps": 0},
}
# Fields accepted unvalidated (not in this file's remit to change); the round trip skips them.
KNOWN_GAPS = {
    ("AdaLoraConfig", "r"): "unused by AdaLoRA: any value passes with a warning, and a value "
    "JSON cannot hold (bytes, a set) then fails in save_adapter's json.dumps",
}
# LongLoRA adapts attention modules only; the MLP has none.
FILE_METHODS = sorted(set(peftkit.METHODS) - {"longlora"})
CLEAR = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
CONFIGS = sorted({m.config_cls for m in peftkit.METHODS.values()}, key=lambda c: c.__name__)
FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Values of every JSON-ish type and a few that are not: the fields' plausible values, off-by-one
# and sign errors, non-finite floats, wrong containers, nested junk.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 4, 8, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, -0.5, float("nan"), float("inf")]),
    st.text(max_size=8),
    st.sampled_from(["fc1", "all-linear", "none", "gaussian", "(", ".*", "", "lora_only"]),
    st.binary(max_size=4),
    st.builds(object),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3),
        st.frozensets(st.integers(), max_size=2),
    ),
    max_leaves=6,
)


def valid_config(method: str) -> peftkit.AdapterConfig:
    cls = peftkit.METHODS[method].config_cls
    try:
        return cls(target_modules=TARGETS, **VALID.get(method, {}))
    except (TypeError, ValueError) as e:
        pytest.skip(f"no valid MLP config known for {method} (add it to VALID): {e}")


def valid_kwargs(cls: type) -> dict[str, Any]:
    for name, m in peftkit.METHODS.items():
        if m.config_cls is cls and name in VALID:
            return VALID[name]
    return {}


def is_model(model: nn.Module) -> bool:
    return any(isinstance(m, Adapter) for m in model.modules())


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_fuzzed_config_kwargs_raise_only_clear_errors(cls: type, data: Any) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    # Half the examples junk every field they set; half change one or two fields of a valid
    # config, so accepted configs (and the round trip below) are exercised too.
    near_valid = data.draw(st.booleans(), label="near valid")
    kwargs: dict[str, Any] = {"target_modules": TARGETS, **valid_kwargs(cls)} if near_valid else {}
    size = 2 if near_valid else len(fields)
    chosen = data.draw(st.lists(st.sampled_from(fields), unique=True, max_size=size))
    kwargs.update({name: data.draw(values, label=name) for name in chosen})
    if "target_modules" not in kwargs and data.draw(st.booleans()):
        kwargs["target_modules"] = ["fc1"]
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as e:
        one_line(e)
        return
    # Accepted: it must describe itself as JSON and read back from that JSON, unchanged.
    if any((cls.__name__, name) in KNOWN_GAPS for name in chosen):
        return
    d = config.to_dict()
    json.dumps(d)
    # Note: run-only fields (how this run holds the adapter, e.g. autocast_adapter_dtype) are
    # never written, so they read back as their defaults.
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    written = dataclasses.replace(
        config, **{n: fields_[n].default for n in RUN_ONLY_FIELDS if n in fields_}
    )
    assert type(config).from_dict(d) == written


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_fuzzed_config_dicts_raise_only_clear_errors(cls: type, data: Any) -> None:
    """``from_dict`` on a file's JSON with keys removed, added or set to junk."""
    base = cls(target_modules=TARGETS, **valid_kwargs(cls)).to_dict()
    d = {k: v for k, v in base.items() if data.draw(st.integers(0, 9), label=f"keep {k}") > 0}
    extra = list(base) + list(cls.unsupported_keys) + ["layer_replication", "zzz"]
    for key in data.draw(st.lists(st.sampled_from(extra), max_size=3, unique=True)):
        d[key] = data.draw(values, label=key)
    try:
        cls.from_dict(d, source="cfg.json")
    except (ValueError, TypeError) as e:
        assert one_line(e).startswith("cfg.json")


# -- damaged files ------------------------------------------------------------------------------


def saved(tmp_path: Path, method: str = "lora") -> tuple[nn.Module, Path]:
    model = MODELS["mlp"](0)
    peftkit.adapt(model, valid_config(method))
    with torch.no_grad():
        for _, layer in peftkit.adapters(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_()
    path = tmp_path / "adapter"
    peftkit.save_adapter(model, path)
    return model.eval(), path


def refused(path: Path, *types: type[BaseException], match: str = "") -> str:
    """Load ``path`` into a fresh model: it must raise one of ``types`` with a one-line message
    naming ``path`` (or a file in it), and leave the model unadapted."""
    fresh = MODELS["mlp"](0)
    with pytest.raises(types or CLEAR) as e:
        peftkit.load_adapter(fresh, path)
    msg = one_line(e.value)
    assert str(path) in msg, msg
    assert match in msg, msg
    assert not is_model(fresh)
    return msg


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_truncated_or_flipped_safetensors(tmp_path_factory: Any, data: Any) -> None:
    model, path = saved(tmp_path_factory.mktemp("fuzz"))
    f = path / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(raw) - 1), label="keep bytes")
        f.write_bytes(bytes(raw[:cut]))
        refused(path, ValueError, match="adapter_model.safetensors")
        return
    for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    f.write_bytes(bytes(raw))
    fresh = MODELS["mlp"](0)
    try:
        peftkit.load_adapter(fresh, path)
    except CLEAR as e:
        # A damaged header, a changed key (missing/unexpected), a changed dtype or shape.
        assert str(path) in one_line(e)
        assert not is_model(fresh)
        return
    # Flips inside the tensor data are undetectable without a checksum: the load is then a
    # faithful read of the (changed) numbers, with the same keys and shapes.
    assert sorted(n for n, _ in peftkit.adapters(fresh)) == ["fc1", "fc2"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors_are_refused_not_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    _, path = saved(tmp_path)
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.fc1.lora_A.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(f))
    msg = refused(path, ValueError, match=f"non-floating dtype: {key}")
    assert "lora_B" not in msg


def test_half_precision_tensors_are_cast(tmp_path: Path) -> None:
    """PEFT writes float16/bfloat16 adapters; those load into float32 layers (a cast)."""
    model, path = saved(tmp_path)
    f = path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    fresh = peftkit.load_adapter(MODELS["mlp"](0), path)
    torch.testing.assert_close(output(fresh, ids()), output(model, ids()), atol=0.1, rtol=0.05)


def edit(path: Path, **changes: Any) -> None:
    cfg = path / "adapter_config.json"
    d = json.loads(cfg.read_text())
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    cfg.write_text(json.dumps(d))


@pytest.mark.parametrize("method", FILE_METHODS)
def test_config_naming_missing_modules(tmp_path: Path, method: str) -> None:
    _, path = saved(tmp_path, method)
    edit(path, target_modules=["decoder.q_proj"])  # nothing matches: adapt refuses
    msg = refused(path, ValueError, match="decoder.q_proj")
    assert "adapter_config.json" in msg and "matches no module" in msg
    # Some names match (PEFT's rule: the list matches any of them): fc2's tensors are left over.
    edit(path, target_modules=["fc1", "decoder.q_proj"])
    refused(path, ValueError, match="unexpected: base_model.model.fc2.")


@pytest.mark.parametrize("method", FILE_METHODS)
def test_missing_and_maths_changing_keys(tmp_path: Path, method: str) -> None:
    cls = peftkit.METHODS[method].config_cls
    _, path = saved(tmp_path, method)
    good = json.loads((path / "adapter_config.json").read_text())
    for key in cls.required_keys():
        edit(path, **{key: KeyError})
        refused(path, ValueError, match=f"missing required key {key!r}")
        (path / "adapter_config.json").write_text(json.dumps(good))
    edit(path, peft_type=KeyError)
    refused(path, ValueError, match="peft_type")
    for key, neutral in cls.unsupported_keys.items():
        (path / "adapter_config.json").write_text(json.dumps(good))
        # A realistic non-neutral value: switch a feature on, a bias mode, an initialisation.
        if neutral is True:
            hostile: Any = "pissa"
        elif neutral == "none":
            hostile = "all"
        elif _is_default_like(neutral):
            hostile = True
        else:
            hostile = 7
        edit(path, **{key: hostile})
        refused(path, ValueError, match=key)


def test_folders_that_are_not_adapters(tmp_path: Path) -> None:
    _, good = saved(tmp_path)
    refused(tmp_path / "absent", FileNotFoundError, match="no such adapter directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, FileNotFoundError, match="not an adapter folder")
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"\x80\x04K\x01.")  # a pickle: never read
    refused(a_file, NotADirectoryError, match="not a directory")

    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    (only_weights / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes()
    )
    refused(only_weights, FileNotFoundError, match="adapter_config.json")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused(pickled, FileNotFoundError, match="never pickle")

    odd = tmp_path / "odd"
    odd.mkdir()
    for text, what in (
        ("[1, 2]", "expected a JSON object"),
        ('{"r": 8}', "peft_type"),
        ('{"peft_type": "IA3", "target_modules": ["fc1"]}', "IA3"),
        ("\udcff", "not valid JSON"),
        ("", "not valid JSON"),
    ):
        (odd / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        refused(odd, ValueError, match=what)
    (odd / "adapter_config.json").unlink()
    (odd / "adapter_config.json").mkdir()  # a folder where the file should be
    refused(odd, FileNotFoundError, match="adapter_config.json")


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: Any) -> None:
    model, path = saved(tmp_path)

    def forbidden(*a: Any, **k: Any) -> Any:
        raise AssertionError("load_adapter called pickle")

    for target, name in (
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ):
        monkeypatch.setattr(target, name, forbidden)
    fresh = peftkit.load_adapter(MODELS["mlp"](0), path)
    torch.testing.assert_close(output(fresh, ids()), output(model, ids()), atol=0, rtol=0)
