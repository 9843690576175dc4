"""The training loop behind ``peftkit train`` and ``bench/q1.py``: load a local Hugging Face
folder, build any registered method's config from a few generic knobs, tokenize with dynamic
padding, train with AdamW at a constant learning rate, and evaluate.

Classification minimises the cross-entropy of the head's logits; a causal LM minimises the
next-token loss

    L = -(1/N) Σ_t log p(x_{t+1} | x_{≤t})          over the N non-padding targets,

and is scored by perplexity ``exp(L)`` over a whole evaluation set (token-weighted, not a mean of
per-batch values). ``transformers`` and ``tqdm`` are imported inside the functions that need them,
so ``import peftkit`` never loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import dist_rank_world
from .config import AdapterConfig
from .core import get_state
from .data import Example
from .hooks import attach
from .methods import METHODS

CLASSIFY, CAUSAL_LM = "classify", "causal-lm"
TASKS = (CLASSIFY, CAUSAL_LM)
TRAIN_INFO = "peftkit_train.json"

# Attention projections tried in order when no target is named: the LoRA paper's query/value
# choice, spelled as each family spells it (BERT, Llama/Mistral/Qwen, DistilBERT, GPT-2, Falcon).
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("c_attn",),
    ("query_key_value",),
)
# The names Hugging Face gives a sequence-classification head, tried before a shape search.
HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (no padding) and, for classification, the labels."""

    ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...] | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class FitResult:
    """What one training run measured: the loss and wall time of every step."""

    losses: list[float]
    step_seconds: list[float]
    seconds: float

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan


# -- models ---------------------------------------------------------------------------------------
def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face folder (``config.json`` + weights), or a FileNotFoundError saying so."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {folder} does not exist; pass --model with a local Hugging Face folder"
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass the folder that "
            "holds config.json and the weights"
        )
    return folder


def load_model(
    path: str | os.PathLike[str],
    task: str,
    *,
    label_names: Sequence[str] = (),
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder: ``AutoModelForSequenceClassification`` with
    ``len(label_names)`` labels (a new head where the checkpoint has none), or
    ``AutoModelForCausalLM``. The tokenizer gets a pad token if it lacks one."""
    folder = check_model_folder(path)
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer in {folder} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    model: Any
    if task == CLASSIFY:
        if len(label_names) < 2:
            raise ValueError(f"classification needs at least 2 labels, got {list(label_names)}")
        names = {i: str(n) for i, n in enumerate(label_names)}
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            num_labels=len(label_names),
            id2label=names,
            label2id={n: i for i, n in names.items()},
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    # Note: decoder classifiers find the last real token through pad_token_id; set it everywhere.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def default_targets(model: nn.Module, method: str | None = None) -> tuple[str, ...] | str:
    """The method's own default targets when it has some and ``model`` has them all (LongLoRA:
    q, k, v and o), else the first of :data:`DEFAULT_TARGETS` whose names all occur in ``model``,
    else ``"all-linear"``."""
    tails = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if method is not None:
        own = _field_default(
            next(
                f
                for f in dataclasses.fields(METHODS[method].config_cls)
                if f.name == "target_modules"
            )
        )
        if isinstance(own, tuple) and own and all(n in tails for n in own):
            return own
    for names in DEFAULT_TARGETS:
        if all(n in tails for n in names):
            return names
    return "all-linear"


def head_modules(model: nn.Module, num_labels: int) -> tuple[str, ...]:
    """The classification head to train in full (``modules_to_save``): a module named like
    :data:`HEAD_NAMES`, else the last ``nn.Linear`` with ``num_labels`` outputs."""
    named = dict(model.named_modules())
    for name in HEAD_NAMES:
        if name in named:
            return (name,)
    last = [
        n for n, m in named.items() if isinstance(m, nn.Linear) and m.out_features == num_labels
    ]
    if not last:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} (no module named "
            f"{' or '.join(HEAD_NAMES)}, no nn.Linear with {num_labels} outputs)"
        )
    return (last[-1].rsplit(".", 1)[-1],)


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (``true``, ``8``, ``[1, 2]``), else
    as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"option {text!r} is not KEY=VALUE (e.g. use_rslora=true)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_config(
    method: str,
    *,
    target_modules: str | Sequence[str],
    modules_to_save: Sequence[str] | None = None,
    r: int | None = None,
    alpha: float | None = None,
    steps: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> AdapterConfig:
    """Any registered method's config from generic knobs, passed only to fields that exist.

    ``r`` goes to ``init_r`` (AdaLoRA's starting rank) where the config has it, else to ``r``;
    ``alpha`` to ``lora_alpha`` (default: the config's own default, a constant that does not
    follow ``r``: 8 for LoRA as in PEFT, 16 for LongLoRA; one rule for the library and the CLI);
    ``steps`` to ``total_step`` (AdaLoRA's schedule); ``options`` are other fields by name
    (``{"use_rslora": True}``) and win over the knobs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[method].config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {"target_modules": target_modules}
    if modules_to_save:
        kwargs["modules_to_save"] = tuple(modules_to_save)
    rank_field = "init_r" if "init_r" in fields else "r" if "r" in fields else None
    if r is not None:
        if rank_field is None:
            raise ValueError(f"method {method!r} has no rank; drop --r")
        kwargs[rank_field] = r
    if "lora_alpha" in fields:
        if alpha is not None:
            kwargs["lora_alpha"] = alpha
    elif alpha is not None:
        raise ValueError(f"method {method!r} has no lora_alpha; drop --alpha")
    if steps is not None and "total_step" in fields:
        kwargs["total_step"] = steps
    # Note: a method that shares another's config is selected by a PEFT-style flag
    # (DoRA is LoraConfig with use_dora=True).
    if f"use_{method}" in fields:
        kwargs[f"use_{method}"] = True
    for key, value in (options or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"method {method!r} has no option {key!r}; its options are {known}")
        kwargs[key] = value
    config = cls(**kwargs)
    if config.method != method:
        raise ValueError(
            f"these options make a {config.method!r} config, not {method!r}; "
            f"use --method {config.method} or drop the option that switches it"
        )
    return config


def quantize_base(model: nn.Module, keep: Sequence[str] = ()) -> nn.Module:
    """QLoRA's storage: every ``nn.Linear`` of the frozen base to NF4 (double quantization),
    except the output head, what the model keeps in fp32 (T5's ``wo``) and the modules named in
    ``keep`` (a head trained in full) with everything under them."""
    from .quant import quantize_

    left = [n for n, _ in model.named_modules() if n and any(k in n.split(".") for k in keep)]
    return quantize_(model, exclude_modules=left)


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# -- data -----------------------------------------------------------------------------------------
def encode(tokenizer: Any, examples: Sequence[Example], task: str, max_length: int) -> Encoded:
    """Tokenize once, truncating to ``max_length``; padding happens per batch (dynamic)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too short; use e.g. --max-length 64")
    if not examples:
        raise ValueError("no examples to encode")
    out = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    ids = tuple(tuple(int(t) for t in row) for row in out["input_ids"])
    if task == CAUSAL_LM:
        # A one-token text has no next token to predict; it would only add a NaN-prone empty row.
        keep = [i for i, row in enumerate(ids) if len(row) >= 2]
        if not keep:
            raise ValueError("every text is shorter than 2 tokens; causal-lm needs longer texts")
        return Encoded(tuple(ids[i] for i in keep), None, int(tokenizer.pad_token_id))
    labels = tuple(int(e.label) for e in examples if e.label is not None)
    if len(labels) != len(ids):
        raise ValueError("classification needs a label on every example")
    return Encoded(ids, labels, int(tokenizer.pad_token_id))


def collate(enc: Encoded, index: Sequence[int], task: str) -> dict[str, Tensor]:
    """A right-padded batch to the longest row: ``input_ids``/``attention_mask`` (B, T) and
    ``labels`` ((B,) classes, or (B, T) next-token targets with padding at -100)."""
    rows = [enc.ids[i] for i in index]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), enc.pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    if task == CAUSAL_LM:
        labels = input_ids.masked_fill(mask == 0, -100)  # (B, T); the model shifts by one
    else:
        assert enc.labels is not None
        labels = torch.tensor([enc.labels[i] for i in index], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def fixed_batch(
    tokenizer: Any, texts: Sequence[str], length: int, task: str, labels: Sequence[int] = ()
) -> dict[str, Tensor]:
    """A batch padded and truncated to exactly ``length`` tokens (for saved-activation counts)."""
    out = tokenizer(
        list(texts), truncation=True, max_length=length, padding="max_length", return_tensors="pt"
    )
    batch = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}  # (B, T)
    if task == CAUSAL_LM:
        batch["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices: seeded permutations of ``range(n)``, one epoch after another
    (a batch may straddle two epochs when ``n`` is small)."""
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size={batch_size} and steps={steps} must be positive")
    g = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=g).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# -- training and evaluation ----------------------------------------------------------------------
def progress(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr that appears only for work longer than a second."""
    from tqdm import tqdm

    # Note: ``disable`` is passed only to turn the bar off, so TQDM_DISABLE=1 still works.
    off: dict[str, Any] = {} if enabled else {"disable": True}
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, delay=1.0, dynamic_ncols=True, **off
    )


def make_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    loraplus_ratio: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with ``loraplus_ratio``, LoRA+'s groups from
    ``peftkit.param_groups`` (B learns ``ratio`` times faster than A)."""
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate {lr!r} must be a positive number, e.g. --lr 2e-3")
    if loraplus_ratio is not None:
        import peftkit

        groups = getattr(peftkit, "param_groups", None)
        if groups is None:
            raise ValueError("--loraplus-ratio needs peftkit.param_groups, not in this version")
        return torch.optim.AdamW(
            groups(model, lr, loraplus_ratio=loraplus_ratio, weight_decay=weight_decay), lr=lr
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class TrainingDiverged(ValueError):
    """The loss, a gradient or (after the update) a trainable parameter became non-finite at
    ``step``; ``updated`` says whether that step's update was applied (the parameters are then
    poisoned; nothing is checkpointed or returned from that step)."""

    def __init__(self, step: int, what: str, *, updated: bool = False) -> None:
        self.step, self.updated = step, updated
        tail = "the update overflowed" if updated else "no update was made with it"
        super().__init__(f"the {what} at step {step}; {tail}")


def targets_in(enc: Encoded, index: Sequence[int], task: str) -> int:
    """What the loss averages over for these rows: tokens predicted (causal LM: every token but a
    row's first) or rows (classification)."""
    if task == CAUSAL_LM:
        return sum(max(len(enc.ids[i]) - 1, 0) for i in index)
    return len(index)


def loss_sum(model: nn.Module, batch: dict[str, Tensor], task: str) -> Tensor:
    """The summed (not averaged) cross-entropy of one batch, so that a window of micro-batches
    can be divided by its total count of targets."""
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if task == CAUSAL_LM:
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V): t predicts t+1
        return F.cross_entropy(flat, labels[:, 1:].reshape(-1), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")  # (B, K) vs (B,)


def accumulate_gradients(
    model: nn.Module, enc: Encoded, index: Sequence[int], task: str, grad_accum: int = 1
) -> float:
    """Backward one optimizer step's batch ``index`` (its global rows, the same list on every
    process) in ``grad_accum`` micro-batches and, under ``torch.distributed``, split across the
    processes; returns the batch's mean loss.

    The gradient is that of ``L = Σ_rows ℓ / N`` with ``N`` the targets of the whole batch
    (:func:`targets_in`: tokens for a causal LM), whatever the split: each micro-batch adds
    ``Σ_its rows ℓ / N``, times the number of processes because data-parallel gradients are
    averaged. Batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradients, not
    a mean of per-micro-batch means (which weights short rows up)."""
    rank, world = dist_rank_world()
    parts = grad_accum * world
    if grad_accum < 1 or len(index) % parts:
        raise ValueError(
            f"a batch of {len(index)} rows does not split into {grad_accum} accumulation steps x "
            f"{world} processes; choose --batch-size as a multiple of {parts}"
        )
    total = targets_in(enc, index, task)
    if total == 0:
        raise ValueError("this batch has nothing to predict (every row is one token long)")
    size = len(index) // grad_accum
    share = size // world
    value = torch.zeros((), dtype=torch.float64)
    no_sync = getattr(model, "no_sync", None)
    for k in range(grad_accum):
        micro = index[k * size : (k + 1) * size]
        mine = micro[rank * share : (rank + 1) * share]
        batch = collate(enc, mine, task)
        ctx = no_sync() if callable(no_sync) and k < grad_accum - 1 else contextlib.nullcontext()
        with ctx:
            loss = loss_sum(model, batch, task) / total
            (loss * world).backward()  # type: ignore[no-untyped-call]
        value += loss.detach().double().cpu()
    if world > 1:
        torch.distributed.all_reduce(value)
    return float(value)


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)  # one fused pass: a NaN or inf anywhere shows here
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _grads_finite(model: nn.Module) -> bool:
    return _all_finite([p.grad for p in model.parameters() if p.grad is not None])


def _params_finite(model: nn.Module) -> bool:
    return _all_finite([p.detach() for p in model.parameters() if p.requires_grad])


def fit(
    model: nn.Module,
    enc: Encoded,
    *,
    task: str,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    grad_accum: int = 1,
    start_step: int = 0,
    losses: Sequence[float] = (),
    on_step: Callable[[int, list[float]], None] | None = None,
    show_progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """``steps`` optimizer steps at a constant learning rate; an adapted model's training hooks
    run through :func:`peftkit.attach` (AdaLoRA's budget, DyLoRA's rank draw, ...).

    ``batch_size`` rows per step (all processes together), backpropagated in ``grad_accum``
    micro-batches (:func:`accumulate_gradients`). ``start_step``/``losses`` continue a resumed run
    (the batch order is a function of ``seed``, so step ``k`` sees the same rows either way);
    ``on_step(step, losses)`` runs after every step (checkpointing). A non-finite loss or gradient
    raises :class:`TrainingDiverged` before the optimizer sees it."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside 0..{steps}")
    if get_state(model, required=False) is not None:
        attach(optimizer, model)
    order = batch_order(len(enc), batch_size, steps, seed)
    model.train()
    losses = list(losses)
    times: list[float] = []
    ema = math.nan
    for value in losses:
        ema = value if math.isnan(ema) else 0.9 * ema + 0.1 * value
    start = time.perf_counter()
    with progress(steps, desc, "step", show_progress) as bar:
        bar.update(start_step)
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            value = accumulate_gradients(model, enc, order[step - 1], task, grad_accum)
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(step, f"loss became {value}")
            if not _grads_finite(model):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(step, "gradient became non-finite (nan or inf)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not _params_finite(model):  # e.g. an fp16 update that overflowed
                raise TrainingDiverged(step, "parameters became non-finite", updated=True)
            times.append(time.perf_counter() - t0)
            losses.append(value)
            if on_step is not None:
                on_step(step, losses)
            ema = value if math.isnan(ema) else 0.9 * ema + 0.1 * value
            bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
            bar.update()
    return FitResult(losses, times, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    enc: Encoded,
    *,
    task: str,
    batch_size: int = 128,
    show_progress: bool = True,
    desc: str = "eval",
    distributed: bool = False,
) -> float:
    """Accuracy (classification) or token-weighted perplexity (causal LM) in eval mode.

    Rows are batched in order of length, which changes no result (each row is masked on its own)
    and saves most of the padding. ``distributed=True``: every rank of the initialised process
    group calls this with the same model and data; rank k scores batches k, k + world, … and the
    counts are summed across ranks, so each rank returns what one process would (perplexity up
    to summation order)."""
    rank, world = dist_rank_world() if distributed else (0, 1)
    if distributed and not torch.distributed.is_initialized():
        raise ValueError(
            "evaluate(distributed=True) needs an initialised torch.distributed process group; "
            "call it from every rank after init_process_group, or pass distributed=False"
        )
    if len(enc) == 0:
        return math.nan  # every rank alike: no collective runs
    was_training = model.training
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = chunks[rank::world]  # sorted by length, so the ranks' shares cost about the same
    # Note: every rank runs the same number of forwards (a short rank repeats batch 0 and does not
    # count it), so a model that communicates in forward (DDP, FSDP2) never waits on a peer.
    spare = -(-len(chunks) // world) - len(mine)
    calls = [(i, True) for i in mine] + [(chunks[0], False)] * spare
    correct = 0
    nll, tokens = 0.0, 0
    with progress(sum(map(len, mine)), desc, "ex", show_progress and rank == 0) as bar:
        for index, counted in calls:
            batch = collate(enc, index, task)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            if not counted:
                continue
            if task == CAUSAL_LM:
                target = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
                flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B·(T-1), V)
                nll += float(F.cross_entropy(flat, target.reshape(-1), reduction="sum"))
                tokens += int((target != -100).sum())
            else:
                correct += int((logits.argmax(dim=-1) == labels).sum())  # (B, K) -> (B,)
            bar.update(len(index))
    model.train(was_training)
    if world > 1:
        # Note: float64 carries the integer counts exactly (below 2⁵³).
        nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        sums = torch.tensor([correct, nll, tokens], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        correct, nll, tokens = int(sums[0]), float(sums[1]), int(sums[2])
    if task == CAUSAL_LM:
        return math.exp(nll / tokens) if tokens else math.nan
    return correct / len(enc)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def full_finetune(model: nn.Module) -> nn.Module:
    """Make every parameter trainable: the full fine-tuning baseline (no adapter)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


__all__ = [
    "CAUSAL_LM",
    "CLASSIFY",
    "DEFAULT_TARGETS",
    "Encoded",
    "FitResult",
    "TRAIN_INFO",
    "TrainingDiverged",
    "accumulate_gradients",
    "batch_order",
    "build_config",
    "check_model_folder",
    "collate",
    "default_targets",
    "encode",
    "evaluate",
    "fit",
    "fixed_batch",
    "full_finetune",
    "head_modules",
    "load_model",
    "loss_sum",
    "make_optimizer",
    "parse_option",
    "peak_rss_bytes",
    "quantize_base",
    "targets_in",
]
