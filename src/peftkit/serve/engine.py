"""Continuous batching across adapters: one thread owns the model and runs one forward per
decoding step for every running row, each row through its own adapter (:func:`peftkit.route`).

    engine = Engine(model, tokenizer, max_batch=16)
    engine.start()
    req = engine.submit(prompt_ids, adapter="math", sampling=Sampling(max_tokens=32), emit=print)
    ...
    engine.stop()

The design (the README's "Serving" section says why this and not transformers' packed
continuous batching):

* **Prefill alone, decode together.** A new request is prefilled on its own (batch 1, no padding,
  its own KV cache, a one-row route: its adapter's own forward in every layer), which gives its
  first token at once; its rows (``n`` choices) then join the running batch at the next
  decoding step.
* **One batched KV cache, left-padded.** The running rows share one ``DynamicCache`` whose rows
  are right-aligned: row i's real tokens fill the last ``len_i`` columns, the columns before are
  zero padding hidden by the attention mask. A joining row is left-padded to the batch's length
  (or the batch to the row's), a finished row is dropped with ``batch_select_indices``, and
  columns that are padding in every remaining row are cut off, so the cache is always as long
  as the longest running row. Each row's position ids count its own real tokens.
* **Per-row adapters in every forward.** Each decoding step is one ``model(...)`` call under
  ``peftkit.route(model, ids)`` with one adapter id per row (−1 = base).
* **Per-request sampling.** Each row samples from its own logits with its own
  ``torch.Generator`` (seeded from the request's ``seed``), so a seeded request samples the same
  tokens whatever it shares the batch with (up to float rounding of the logits).

What is and is not exact: prefill is the same computation served alone or together; a decoding
step computes a row's logits in a batch of other rows, whose GEMM shapes and padding differ from
the batch of one, so logits agree to float rounding (about 1e-6 in fp32), not bit for bit. Greedy
tokens are therefore the ones the request gets served alone unless two logits tie to within that
rounding.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
#: Prompt tokens prefilled between two decoding steps (at least one request is always admitted):
#: bounds how long the running rows wait while new requests are prefilled.
PREFILL_TOKENS_PER_STEP = 512


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How one request samples: OpenAI's fields, validated by the caller."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes


@dataclass
class Event:
    """What the engine tells a request's owner: ``kind`` is ``"token"`` (``text`` is the new
    text of choice ``index``, maybe empty), ``"done"`` (choice ``index`` finished with
    ``finish_reason``; ``text`` is its last piece), or ``"error"`` (``text`` says why; the
    request is over)."""

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class Choice:
    """One row of the batch: a request's choice, its tokens so far and its text state."""

    def __init__(self, request: Request, index: int, generator: torch.Generator) -> None:
        self.request = request
        self.index = index
        self.generator = generator
        self.tokens: list[int] = []
        self.sent = ""  # text already given to the owner
        self.cached = 0  # real tokens in the KV cache (the next token's position)
        self.finished: str | None = None


class Request:
    """A submitted request; :meth:`Engine.cancel` (or :meth:`cancel`) frees its rows."""

    def __init__(
        self,
        prompt: Sequence[int],
        adapter: str | None,
        sampling: Sampling,
        emit: Callable[[Event], None],
    ) -> None:
        self.id = secrets.token_hex(6)
        self.prompt = list(prompt)
        self.adapter = adapter
        self.sampling = sampling
        self.emit = emit
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.completion_tokens = 0
        self.choices: list[Choice] = []

    def cancel(self) -> None:
        # Note: a plain flag, read by the engine thread at its next step: setting a bool is atomic.
        self.cancelled = True


@dataclass
class Stats:
    """Counters for the progress log."""

    requests: int = 0
    tokens: int = 0
    steps: int = 0
    since: float = field(default_factory=time.monotonic)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token from one row's ``logits`` (V,): greedy at temperature 0, else softmax of
    ``logits / temperature`` cut to the smallest set of tokens whose probability reaches
    ``top_p`` (nucleus sampling), drawn with ``generator``."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        p, order = torch.sort(probs, descending=True)  # (V,), (V,)
        keep = (torch.cumsum(p, 0) - p) < top_p  # tokens before the mass reached top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a response: the tokenizer's eos and the generation config's."""
    out: set[int] = set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        out.add(eos)
    elif isinstance(eos, (list, tuple)):
        out.update(int(e) for e in eos)
    return out


def check_routable(model: nn.Module, name: str) -> None:
    """ValueError unless adapter ``name`` can share a batch with others (a route refuses
    merged and Delta-LoRA adapters, with the way out)."""
    with peftkit.route(model, [name]):
        pass


def check_cache(model: nn.Module) -> None:
    """ValueError unless every layer of the model's KV cache is a plain growing one: the
    engine left-pads and trims the batch's cache, which a sliding-window layer does not allow."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]
    if sliding:
        raise ValueError(
            f"{type(model).__name__} has sliding-window attention (layers {sliding[:4]}...), "
            "which peftkit serve does not support yet; serve a model with full attention"
        )


class Engine:
    """The scheduler: a queue of requests, one background thread, one batched forward per step.

    ``model`` is a causal LM (transformers), with or without peftkit adapters; the engine owns
    it once started (load and unload adapters through :meth:`load_adapter` and
    :meth:`unload_adapter`, which run between steps). ``max_batch`` bounds the running rows."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        check_cache(model)
        self.model = model.eval()
        # Note: a copy for the engine thread; the server's event loop tokenizes prompts with the
        # original at the same time, and a fast tokenizer's Python wrapper is not thread-safe.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.eos = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: list[Request] = []
        self.rows: list[Choice] = []
        self.cache: Any = None  # the running rows' DynamicCache
        self.mask: Tensor | None = None  # (rows, cache length): 1 = a real token
        self.control: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.stats = Stats()
        # adapters being unloaded: no new request may name them
        self.leaving: set[str] = set()
        self.route_stack: contextlib.ExitStack | None = None
        self.route_key: tuple[str | None, ...] | None = None
        self._base_outside_routes()

    def _base_outside_routes(self) -> None:
        # Note: no adapter active, so a forward without a route is the base model: a batch of
        # base rows only then runs with no routing work at all.
        if peftkit.adapter_names(self.model):
            peftkit.set_adapter(self.model, [])

    # -- the caller's side (any thread) ---------------------------------------------------------
    def adapters(self) -> list[str]:
        """The adapters requests may name now."""
        return [n for n in peftkit.adapter_names(self.model) if n not in self.leaving]

    def submit(
        self,
        prompt: Sequence[int],
        *,
        adapter: str | None,
        sampling: Sampling,
        emit: Callable[[Event], None],
    ) -> Request:
        """Queue a request; ``emit`` is called from the engine thread with each :class:`Event`."""
        if sampling.n > self.max_batch:
            raise ValueError(f"n={sampling.n} is more than the server's max batch {self.max_batch}")
        if not prompt:
            raise ValueError("the prompt is empty")
        req = Request(prompt, adapter, sampling, emit)
        self.inbox.put(req)
        self.wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        self.wake.set()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between two steps; the future holds its result."""
        fut: Future[Any] = Future()
        self.control.put((fn, fut))
        self.wake.set()
        return fut

    def load_adapter(self, name: str, path: str) -> Future[Any]:
        """Load an adapter folder as ``name`` between steps (strict; on failure the model is as
        it was)."""

        def load() -> None:
            peftkit.load_adapter(self.model, path, name=name, trainable=False)
            self.model.eval()
            self._base_outside_routes()
            try:
                check_routable(self.model, name)
            except ValueError:
                peftkit.delete_adapter(self.model, name)
                raise

        return self.call(load)

    def unload_adapter(self, name: str) -> Future[Any]:
        """Stop taking requests for ``name``, let its running requests finish, then delete it."""
        if name not in self.adapters():
            raise ValueError(f"no adapter named {name!r}; the server has {self.adapters()}")
        self.leaving.add(name)
        done: Future[Any] = Future()

        def try_delete() -> None:
            self._take_inbox()  # requests submitted before the unload still get their answer
            busy = any(c.request.adapter == name for c in self.rows) or any(
                r.adapter == name for r in self.waiting
            )
            if busy:
                self.control.put((try_delete, Future()))  # again after the next step
                return
            try:
                peftkit.delete_adapter(self.model, name)
                done.set_result(None)
            except BaseException as e:  # pragma: no cover - delete of a known name
                done.set_exception(e)
            finally:
                self.leaving.discard(name)

        self.control.put((try_delete, Future()))
        self.wake.set()
        return done

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def load(self) -> tuple[int, int]:
        """``(running rows, waiting requests)``."""
        return len(self.rows), len(self.waiting) + self.inbox.qsize()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="peftkit-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then end the thread."""
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------
    def run(self) -> None:
        # Note: no_grad, not inference_mode: adapters loaded between steps must stay ordinary
        # tensors (inference tensors have no version counter, which routing's caches read).
        with torch.no_grad():
            while True:
                worked = self.step()
                if not worked:
                    if self.stopping and self.inbox.empty() and self.control.empty():
                        self._close_route()
                        return
                    self.wake.wait(0.05)
                    self.wake.clear()

    def step(self) -> bool:
        """One scheduling step: control calls, admissions (prefill), one decoding step.
        Returns whether there was anything to do. A forward that raises ends the requests it
        served with an ``"error"`` event (and the traceback on stderr); the engine goes on."""
        worked = self._run_control()
        self._take_inbox()
        worked = self._admit() or worked
        self._drop_finished()
        if self.rows:
            try:
                self._decode()
            except Exception as e:
                self._close_route()
                self._fail({id(c.request): c.request for c in self.rows}.values(), e)
                self.rows, self.cache, self.mask = [], None, None
            self._drop_finished()
            worked = True
        return worked

    def _take_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _fail(self, requests: Any, e: BaseException) -> None:
        traceback.print_exception(e, file=sys.stderr)
        for req in requests:
            if req.finished is None:
                req.finished = time.monotonic()
                req.emit(Event("error", text=f"{type(e).__name__}: {e}"))

    def _run_control(self) -> bool:
        pending = []
        while True:
            try:
                pending.append(self.control.get_nowait())
            except queue.Empty:
                break
        if pending:
            self._close_route()  # adapters may change: ids are positions in adapter_names
        for fn, fut in pending:
            if fut.done():
                continue
            try:
                result = fn()
            except BaseException as e:
                fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)
        return bool(pending)

    def _route(self, adapters: Sequence[str | None]) -> Any:
        """A route with one adapter per row (a no-op context for base rows only)."""
        if all(a is None for a in adapters):
            # the base alone: no adapter is active outside a route (see _base_outside_routes)
            return contextlib.nullcontext()
        names = peftkit.adapter_names(self.model)
        ids = torch.tensor([names.index(a) if a is not None else -1 for a in adapters])
        # frozen: weights change only through control calls, which close the route first
        return peftkit.route(self.model, ids, frozen=True)

    def _alone(self, adapter: str | None) -> Any:
        """The model as ``adapter`` alone gives it (a prefill is one request): a one-row route,
        in which every adapted layer runs that adapter's own forward, the computation it does
        as the one active adapter (no stacking, so the decoding steps' cached stacks stay)."""
        return self._route([adapter])

    def _decode_route(self) -> None:
        """Keep the decoding steps' route open while the running rows stay the same: a route
        caches its per-layer plans (positions, masks, stacked factors), so steps after the
        first reuse them."""
        key = tuple(c.request.adapter for c in self.rows)
        if key == self.route_key and self.route_stack is not None:
            return
        self._close_route()
        stack = contextlib.ExitStack()
        stack.enter_context(self._route(key))
        self.route_stack, self.route_key = stack, key

    def _close_route(self) -> None:
        if self.route_stack is not None:
            self.route_stack.close()
        self.route_stack, self.route_key = None, None

    def _admit(self) -> bool:
        budget = PREFILL_TOKENS_PER_STEP
        admitted = False
        keep: list[Request] = []
        for req in self.waiting:
            if req.cancelled:
                self._finish_request(req)
                continue
            room = self.max_batch - len(self.rows)
            if req.sampling.n > room or (admitted and len(req.prompt) > budget):
                keep.append(req)
                continue
            try:
                self._prefill(req)
            except Exception as e:
                self._fail([req], e)
                for c in req.choices:
                    c.finished = CANCELLED
            budget -= len(req.prompt)
            admitted = True
        self.waiting = keep
        return admitted

    def _prefill(self, req: Request) -> None:
        from transformers import DynamicCache

        self._close_route()  # routes do not nest: the decoding steps' route is reopened after
        n = req.sampling.n
        ids = torch.tensor([req.prompt], device=self.device)  # (1, P)
        cache = DynamicCache(config=self.model.config)  # type: ignore[arg-type]
        with self._alone(req.adapter):
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()  # (V,)
        seed = req.sampling.seed
        for i in range(n):
            g = torch.Generator(device="cpu")
            g.manual_seed(seed + i if seed is not None else secrets.randbits(63))
            c = Choice(req, i, g)
            c.cached = len(req.prompt)
            req.choices.append(c)
        req.first_token = time.monotonic()
        self.stats.requests += 1
        for c in req.choices:
            self._advance(
                c, sample(logits.cpu(), req.sampling.temperature, req.sampling.top_p, c.generator)
            )
        live = [c for c in req.choices if c.finished is None]
        if not live:
            self._finish_request(req)
            return
        if len(live) > 1:  # the choices share the prompt: copies of its KV, one per choice
            cache.batch_repeat_interleave(len(live))
        self._join(cache, live, len(req.prompt))

    def _join(self, cache: Any, rows: list[Choice], length: int) -> None:
        """Add ``rows`` (whose KV, ``length`` tokens each, is in ``cache``) to the batch."""
        new_mask = torch.ones(len(rows), length, dtype=torch.long, device=self.device)
        if self.cache is None or self.mask is None or not self.rows:
            self.cache, self.mask, self.rows = cache, new_mask, list(rows)
            return
        have = int(self.mask.shape[1])
        if length < have:
            for layer in cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, have - length, 0))  # (n, H, have, D)
                layer.values = F.pad(layer.values, (0, 0, have - length, 0))
            new_mask = F.pad(new_mask, (have - length, 0))
        elif length > have:
            for layer in self.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, length - have, 0))  # (B, H, length, D)
                layer.values = F.pad(layer.values, (0, 0, length - have, 0))
            self.mask = F.pad(self.mask, (length - have, 0))
        # Note: rows are kept sorted by adapter (the new ones go in after the last row whose
        # adapter sorts at or before theirs, in the same copy that joins them), so that a
        # decoding step's rows are already grouped by adapter for peftkit.route.
        names = peftkit.adapter_names(self.model)

        def rank(c: Choice) -> int:
            a = c.request.adapter
            return names.index(a) if a in names else -1

        new_rank = rank(rows[0])
        at = sum(1 for c in self.rows if rank(c) <= new_rank)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            k, v = mine.keys, mine.values
            mine.keys = torch.cat([k[:at], theirs.keys, k[at:]], 0)  # (B + n, H, L, D)
            mine.values = torch.cat([v[:at], theirs.values, v[at:]], 0)
        self.mask = torch.cat([self.mask[:at], new_mask, self.mask[at:]], 0)
        self.rows[at:at] = rows

    def _decode(self) -> None:
        assert self.mask is not None
        rows = self.rows
        ids = torch.tensor([[c.tokens[-1]] for c in rows], device=self.device)  # (B, 1)
        pos = torch.tensor([[c.cached] for c in rows], device=self.device)  # (B, 1)
        mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        self._decode_route()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True
        )
        self.mask = mask
        logits = out.logits[:, -1].float().cpu()  # (B, V)
        greedy = torch.argmax(logits, dim=-1).tolist()  # (B,)
        self.stats.steps += 1
        for i, c in enumerate(rows):
            c.cached += 1
            sp = c.request.sampling
            tok = (
                greedy[i]
                if sp.temperature == 0
                else sample(logits[i], sp.temperature, sp.top_p, c.generator)
            )
            self._advance(c, tok)

    def _advance(self, c: Choice, token: int) -> None:
        """Append ``token`` to choice ``c``, send the new text, and finish it on eos, a stop
        string or its token budget."""
        req = c.request
        if req.cancelled:
            c.finished = CANCELLED
            return
        sp = req.sampling
        self.stats.tokens += 1
        req.completion_tokens += 1
        if token in self.eos and not sp.ignore_eos:
            c.finished = STOP
            self._send(c, self._text(c), final=True)
            return
        c.tokens.append(token)
        text = self._text(c)
        for s in sp.stop:
            at = text.find(s, max(0, len(c.sent) - len(s) + 1))
            if at >= 0:
                text = text[:at]
                c.finished = STOP
        if c.finished is None and len(c.tokens) >= sp.max_tokens:
            c.finished = LENGTH
        self._send(c, text, final=c.finished is not None)

    def _text(self, c: Choice) -> str:
        return str(self.tokenizer.decode(c.tokens, skip_special_tokens=True))

    def _send(self, c: Choice, text: str, *, final: bool) -> None:
        if not final:
            # hold back an unfinished UTF-8 character and a possible start of a stop string
            while text.endswith("\ufffd"):
                text = text[:-1]
            hold = 0
            for s in c.request.sampling.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold]
        # Note: the text so far is normally a prefix of the text with one more token; where a
        # tokenizer rewrites earlier text, the new piece is what follows what was already sent.
        delta = text[len(c.sent) :] if len(text) > len(c.sent) else ""
        c.sent += delta
        if final:
            c.request.emit(Event("done", c.index, delta, c.finished))
        elif delta:
            c.request.emit(Event("token", c.index, delta))

    def _drop_finished(self) -> None:
        for c in self.rows:
            if c.finished is None and c.request.cancelled:
                c.finished = CANCELLED
        if all(c.finished is None for c in self.rows):
            return
        keep = [i for i, c in enumerate(self.rows) if c.finished is None]
        done = {id(c.request): c.request for c in self.rows if c.finished is not None}
        self.rows = [self.rows[i] for i in keep]
        for req in done.values():
            if all(c.finished is not None for c in req.choices):
                self._finish_request(req)
        if not keep:
            self.cache, self.mask = None, None
            self._close_route()
            return
        assert self.mask is not None
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        lead = int(self.mask.shape[1]) - max(c.cached for c in self.rows)
        if lead > 0:  # columns that are padding in every remaining row
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]

    def _finish_request(self, req: Request) -> None:
        if req.finished is not None:
            return
        req.finished = time.monotonic()
        if req.cancelled:
            req.emit(Event("done", 0, "", CANCELLED))
