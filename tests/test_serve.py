"""``peftkit serve`` as a real process on 127.0.0.1, over a tiny random model folder with a
tokenizer and 3 adapters, queried with the official ``openai`` client and raw HTTP: the models
list, completions and chat per adapter and base equal to local greedy generation, streaming,
64 concurrent requests each equal to its solo answer, every bad input's status, runtime
load/unload, a client leaving mid-stream, and SIGTERM draining the requests in flight.

Every wait is bounded; each server process is killed at the end whatever happens."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import peftkit  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
ADAPTERS = ("a1", "a2", "a3")
KEY = "sk-test-key"
BASE = "tiny"
CONTEXT = 128
START_TIMEOUT_S = 120
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = (
    "hello world",
    "the quick brown fox jumps",
    "one two three",
    "adapters change the text of a tiny model",
    "how are you today?",
    "seven six five",
    "over the lazy dog",
    "text",
)


# -- the fixture: a tiny model folder, a tokenizer, three adapters ------------------------------
def build_tokenizer() -> Any:
    """A byte-level BPE trained in-process on a few ASCII sentences (every token decodes to
    ASCII), with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(list(PROMPTS) * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_folder(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    # Note: weights of std 0.3 (not 0.02) spread the logits, so greedy choices are not near-ties
    # that float rounding could flip between a batch of one and a batch of many.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(root / BASE)
    tok.save_pretrained(root / BASE)
    for i, name in enumerate(ADAPTERS):
        m = LlamaForCausalLM.from_pretrained(root / BASE)
        targets = ["q_proj", "v_proj", "down_proj"]
        peftkit.adapt(m, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                if not p.requires_grad:
                    continue
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # B non-zero: changes the text
        peftkit.save_adapter(m, root / name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    build_folder(root)
    return root


class Server:
    """A ``peftkit serve`` process; its stderr (the request log) goes to a file."""

    def __init__(self, root: Path, *args: str) -> None:
        self.log_path = root / f"serve-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
        }
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peftkit",
                "serve",
                "--model",
                str(root / BASE),
                "--port",
                "0",
                "--threads",
                "1",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log_file,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        self.port = 0
        while time.monotonic() < deadline:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if not self.port:
            self.stop()
            raise AssertionError(f"the server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()

    def client(self, key: str = KEY) -> Any:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60
        )

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            if key is not None:
                h["Authorization"] = f"Bearer {key}"
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            text = resp.read().decode()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, text
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    adapters = [f"--adapter={n}={folder / n}" for n in ADAPTERS]
    s = Server(
        folder,
        *adapters,
        "--api-key",
        KEY,
        "--allow-adapter-loading",
        "--served-model-name",
        BASE,
        "--max-body-bytes",
        "65536",
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def local(folder: Path) -> Any:
    """The same model and adapters in this process, for local ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / BASE)
    model = AutoModelForCausalLM.from_pretrained(folder / BASE).eval()
    for n in ADAPTERS:
        peftkit.load_adapter(model, folder / n, name=n)
    return model, tok


def local_generate(local: Any, adapter: str | None, ids: list[int], max_new: int) -> str:
    model, tok = local
    x = torch.tensor([ids])
    with torch.inference_mode(), peftkit.route(model, [adapter]):
        out = model.generate(
            x,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0, x.shape[1] :], skip_special_tokens=True))


def chat_ids(tok: Any, text: str) -> list[int]:
    t = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tok(t, add_special_tokens=False)["input_ids"])


def name_of(adapter: str | None) -> str:
    return adapter or BASE


# -- tests ----------------------------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(server: Server, folder: Path) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [BASE, *ADAPTERS]
    status, body = server.http("GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert body["data"][1]["parent"] == BASE
    assert body["data"][1]["root"] == str((folder / "a1").resolve())
    assert server.http("GET", "/health", key=None)[1]["status"] == "ok"


def test_completion_chat_and_stream_equal_local_generate(server: Server, local: Any) -> None:
    client = server.client()
    _, tok = local
    texts = set()
    for adapter in (None, *ADAPTERS):
        prompt = PROMPTS[1]
        want = local_generate(local, adapter, list(tok(prompt)["input_ids"]), 12)
        got = client.completions.create(
            model=name_of(adapter), prompt=prompt, max_tokens=12, temperature=0
        )
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        texts.add(want)

        chunks = list(
            client.completions.create(
                model=name_of(adapter), prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        q = "how are you today?"
        want = local_generate(local, adapter, chat_ids(tok, q), 10)
        msgs = [{"role": "user", "content": q}]
        got = client.chat.completions.create(
            model=name_of(adapter), messages=msgs, max_tokens=10, temperature=0
        )
        assert got.choices[0].message.content == want
        assert got.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model=name_of(adapter),
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len(texts) == 4, "each adapter should change the greedy text"


def test_seeded_sampling_n_and_stop(server: Server) -> None:
    client = server.client()
    kw: dict[str, Any] = dict(
        model="a2", prompt="one two", max_tokens=16, temperature=0.9, top_p=0.95, seed=7, n=3
    )
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len(first.choices) == 3 and first.usage.completion_tokens >= 3
    # a stop string cuts the text before it and ends the choice with "stop"
    full = client.completions.create(model="a1", prompt="hello", max_tokens=30, temperature=0)
    text = full.choices[0].text
    if len(text) > 4:
        stop = text[2:4]
        cut = client.completions.create(
            model="a1", prompt="hello", max_tokens=30, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(
            model="a1", prompt="hello", max_tokens=30, temperature=0, stop=[stop], stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


@pytest.mark.slow
def test_64_concurrent_requests_equal_their_solo_answers(server: Server) -> None:
    client = server.client()
    jobs = [
        (
            name_of([None, *ADAPTERS][i % 4]),
            PROMPTS[(i // 4) % len(PROMPTS)],
            4 + (i * 7) % 13,
            i % 3 == 0,
        )
        for i in range(64)
    ]

    def ask(job: tuple[str, str, int, bool]) -> str:
        model, prompt, n, chat = job
        if chat:
            r = client.chat.completions.create(
                model=model,
                max_tokens=n,
                temperature=0,
                messages=[{"role": "user", "content": prompt}],
            )
            return str(r.choices[0].message.content)
        return str(
            client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
            .choices[0]
            .text
        )

    solo = [ask(j) for j in jobs]  # one at a time: each request alone in the batch
    before = server.http("GET", "/health")[1]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, jobs, timeout=120))
    after = server.http("GET", "/health")[1]
    assert together == solo
    # rows shared decoding steps: fewer steps than the tokens decoded after each first token
    decoded = (after["tokens"] - before["tokens"]) - (after["requests"] - before["requests"])
    assert after["steps"] - before["steps"] < decoded


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server: Server) -> None:
    ok = {"model": "a1", "prompt": "hello", "max_tokens": 2}
    long_prompt = " ".join(["seven six five"] * 60)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("POST", {"raw": b"{not json"}, 400, "not valid JSON"),
        ("POST", {"raw": b"[1, 2]"}, 400, "JSON object"),
        ("POST", {"body": {"prompt": "x"}}, 400, "model"),
        ("POST", {"body": {"model": "a1"}}, 400, "prompt"),
        ("POST", {"body": {**ok, "max_tokens": "ten"}}, 400, "max_tokens"),
        ("POST", {"body": {**ok, "max_tokens": True}}, 400, "max_tokens"),
        ("POST", {"body": {**ok, "temperature": "hot"}}, 400, "temperature"),
        ("POST", {"body": {**ok, "stream": "yes"}}, 400, "stream"),
        ("POST", {"body": {**ok, "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop"),
        ("POST", {"body": {**ok, "n": 1000}}, 400, "`n`"),
        ("POST", {"body": {**ok, "logprobs": 3}}, 400, "logprobs"),
        ("POST", {"body": {**ok, "model": "nope"}}, 404, "a1, a2, a3"),
        ("POST", {"body": {**ok, "max_tokens": 0}}, 400, "max_tokens"),
        ("POST", {"body": {**ok, "max_tokens": 10**6}}, 400, "max_tokens"),
        (
            "POST",
            {"body": {**ok, "prompt": long_prompt, "max_tokens": 8}},
            400,
            f"maximum context length is {CONTEXT}",
        ),
        ("POST", {"body": {**ok, "prompt": "x" * 70000}}, 413, "limit"),
        ("POST", {"body": ok, "key": None}, 401, "API key"),
        ("POST", {"body": ok, "key": "wrong"}, 401, "API key"),
        ("GET", {"path": "/v1/nothing"}, 404, "no such endpoint"),
    ]
    for method, spec, code, words in cases:
        status, body = server.http(
            method,
            spec.get("path", "/v1/completions"),
            spec.get("body"),
            raw=spec.get("raw"),
            key=spec.get("key", KEY),
        )
        assert status == code, (spec, body)
        assert isinstance(body, dict) and set(body["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }, body
        assert words in body["error"]["message"], body
    status, body = server.http(
        "POST", "/v1/completions", {**ok, "prompt": long_prompt, "max_tokens": 8}
    )
    assert (
        str(CONTEXT) in body["error"]["message"]
        and "8 for the completion" in body["error"]["message"]
    )
    assert body["error"]["code"] == "context_length_exceeded"
    bad_chat = [
        {"model": "a1", "messages": []},
        {"model": "a1", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "a1", "messages": [{"role": "user", "content": 3}]},
    ]
    for b in bad_chat:
        assert server.http("POST", "/v1/chat/completions", b)[0] == 400
    # a chunked body (no Content-Length) over the limit is cut off while it is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        parts = iter([b'{"model": "a1", "prompt": "'] + [b"x" * 8192] * 10 + [b'"}'])
        conn.request(
            "POST",
            "/v1/completions",
            body=parts,  # an iterable: sent chunked
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    # still healthy, and still answering
    status, health = server.http("GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok"
    status, body = server.http("POST", "/v1/completions", ok)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_runtime_load_then_unload(server: Server, folder: Path) -> None:
    client = server.client()
    want = client.completions.create(model="a3", prompt="hello", max_tokens=8, temperature=0)
    status, text = server.http(
        "POST", "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(folder / "a3")}
    )
    assert status == 200 and "added successfully" in text
    assert "again" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="again", prompt="hello", max_tokens=8, temperature=0)
    assert got.choices[0].text == want.choices[0].text
    # a failed load (not an adapter folder; a name in use) changes nothing
    for body in (
        {"lora_name": "broken", "lora_path": str(folder / BASE)},
        {"lora_name": "a1", "lora_path": str(folder / "a2")},
        {"lora_name": "x"},
    ):
        status, err = server.http("POST", "/v1/load_lora_adapter", body)
        assert status == 400, err
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS, "again"]
    status, text = server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "again"})
    assert status == 200 and "removed successfully" in text
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="again", prompt="hello", max_tokens=2)
    assert server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "again"})[0] == 404
    # the other adapters still answer as before
    again = client.completions.create(model="a3", prompt="hello", max_tokens=8, temperature=0)
    assert again.choices[0].text == want.choices[0].text


def test_a_client_leaving_mid_stream_frees_its_row(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {
        "model": "a1",
        "prompt": "hello",
        "max_tokens": CONTEXT - 4,
        "temperature": 0.8,
        "n": 8,
        "stream": True,
        "seed": 1,
    }
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(2)  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "client left" not in server.log():
        time.sleep(0.05)
    assert "stream (client left)" in server.log()
    while time.monotonic() < deadline and server.http("GET", "/health")[1]["running"]:
        time.sleep(0.05)
    assert server.http("GET", "/health")[1]["running"] == 0


def test_generate_command_equals_the_server(server: Server, folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "generate",
            "--model",
            str(folder / BASE),
            "--adapter",
            str(folder / "a2"),
            "--prompt",
            "hello world",
            "--raw",
            "--max-tokens",
            "12",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    want = server.client().completions.create(
        model="a2", prompt="hello world", max_tokens=12, temperature=0
    )
    assert out.stdout.rstrip("\n") == want.choices[0].text


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(folder: Path) -> None:
    # max batch 1: the requests run one after another, so most are still queued at SIGTERM
    s = Server(folder, f"--adapter=a1={folder / 'a1'}", "--max-batch", "1")
    try:
        assert (
            s.http(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": "x", "lora_path": str(folder / "a2")},
                key=None,
            )[0]
            == 404
        )
        client = s.client("unused")
        results: list[tuple[str, str | None]] = []
        first = threading.Event()

        def ask(i: int) -> None:
            text, reason = "", None
            for c in client.completions.create(
                model="a1" if i % 2 else BASE,
                prompt=PROMPTS[i],
                max_tokens=40,
                temperature=0.5,
                seed=i,
                stream=True,
            ):
                first.set()
                text += c.choices[0].text
                reason = c.choices[0].finish_reason or reason
            results.append((text, reason))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert first.wait(60)
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and sum(s.http("GET", "/health")[1][k] for k in ("running", "waiting")) < 4
        ):
            time.sleep(0.01)  # until every request has reached the server
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert s.proc.wait(60) == 0
        assert len(results) == 4 and all(r in ("stop", "length") for _, r in results)
        assert "SIGTERM: not accepting new requests" in s.log()
        with pytest.raises(ConnectionError):
            s.http("GET", "/health")
    finally:
        s.stop()


# -- the engine in this process -------------------------------------------------------------------
def test_engine_refuses_what_it_cannot_batch(folder: Path, local: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from peftkit.serve.engine import Engine

    # a sliding-window model: the engine left-pads and trims its cache, which such layers forbid
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        Engine(Gemma3ForCausalLM(cfg), local[1])
    # a Delta-LoRA adapter changes W, which every row shares: loading it fails, nothing changes
    m = AutoModelForCausalLM.from_pretrained(folder / BASE)
    peftkit.adapt(m, peftkit.DeltaLoraConfig(r=2, target_modules=["q_proj"]))
    peftkit.save_adapter(m, tmp_path / "delta")
    model = AutoModelForCausalLM.from_pretrained(folder / BASE).eval()
    peftkit.load_adapter(model, folder / "a1", name="a1")
    engine = Engine(model, local[1])
    fut = engine.load_adapter("delta", str(tmp_path / "delta"))
    engine.step()
    with pytest.raises(ValueError, match="Delta-LoRA"):
        fut.result(timeout=0)
    assert peftkit.adapter_names(model) == ["a1"]
