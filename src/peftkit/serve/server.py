"""Running ``peftkit serve``: load the model and adapters, start the engine thread, run uvicorn,
and on SIGTERM (or ^C) stop accepting, finish the requests in flight, and return 0."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import peftkit

from .app import MAX_BODY_BYTES, Guard, ServerState, build_app, log
from .engine import Engine, check_routable

#: Seconds between two progress lines while requests are running.
PROGRESS_EVERY_S = 10.0


def load_served_model(
    model_dir: str | os.PathLike[str], adapters: Sequence[tuple[str, str]]
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a causal LM from a local folder in eval mode, with each
    ``(name, folder)`` adapter loaded strictly and frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass --model DIR, or "
            "leave --model out to serve SmolLM2-135M-Instruct (`peftkit fetch-model` once)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    for name, path in adapters:
        peftkit.load_adapter(model, path, name=name, trainable=False)
        check_routable(model, name)
    model.eval()
    return model, tokenizer


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest prompt + completion: the model's ``max_position_embeddings``."""
    n = getattr(model.config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1 << 30:
        return limit
    raise ValueError("the model's config has no max_position_embeddings; cannot check lengths")


def run_server(
    *,
    model: Any,
    tokenizer: Any,
    base_name: str,
    model_path: str,
    adapter_paths: dict[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    api_key: str | None = None,
    allow_loading: bool = False,
    max_body: int = MAX_BODY_BYTES,
) -> int:
    """Serve until SIGTERM or SIGINT; returns 0 after a drained shutdown."""
    import uvicorn

    engine = Engine(model, tokenizer, max_batch=max_batch)
    state = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        base_name=base_name,
        model_path=model_path,
        context=context_length(model, tokenizer),
        api_key=api_key,
        allow_loading=allow_loading,
        max_body=max_body,
        adapter_paths=dict(adapter_paths),
    )
    app = Guard(build_app(state), api_key=api_key, max_body=max_body)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # the request log is ours, on stderr
        lifespan="off",
        timeout_graceful_shutdown=None,  # SIGTERM waits for every request in flight
    )
    server = uvicorn.Server(config)
    engine.start()

    # Note: uvicorn runs in a thread so that this thread owns the signals: uvicorn's own handler
    # re-raises SIGTERM after its graceful shutdown, which would end the process with -15; a
    # drained shutdown is a success, so it returns 0 here.
    def on_signal(sig: int, frame: FrameType | None) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        log(
            f"{signal.Signals(sig).name}: not accepting new requests; finishing "
            f"{sum(engine.load())} in flight"
        )

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as e:  # e.g. the port is taken
            failed.append(e)

    t = threading.Thread(target=serve, name="peftkit-http", daemon=True)
    t.start()
    try:
        announced = False
        last = time.monotonic()
        seen = (0, 0)
        while t.is_alive():
            t.join(0.2)
            if not announced and server.started:
                announced = True
                sock = server.servers[0].sockets[0].getsockname() if server.servers else None
                bound = sock[1] if sock else port
                names = ", ".join([base_name, *engine.adapters()])
                log(
                    f"peftkit serve: listening on http://{host}:{bound} (models: {names}; "
                    f"max batch {max_batch}{'; API key required' if api_key else ''})"
                )
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                rows, waiting = engine.load()
                st = engine.stats
                done = (st.requests, st.tokens)
                if rows or waiting or done != seen:
                    dt = time.monotonic() - last
                    log(
                        f"progress: {rows} rows running, {waiting} waiting, "
                        f"{(done[1] - seen[1]) / dt:.1f} tokens/s, {done[0]} requests so far"
                    )
                seen, last = done, time.monotonic()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    engine.stop()
    if failed:
        raise failed[0]
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (see the message above)")
    log("peftkit serve: stopped")
    return 0
