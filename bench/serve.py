"""Serving: one ``peftkit serve`` process with 8 adapters, 64 requests of 64 prompt + 64 new
tokens sent 16 at a time by this process (streamed, over 127.0.0.1). Reports output tokens/s and
time to first token (p50, p99) for:

* ``mixed``: request i names adapter i mod 8;
* ``base``: the same requests, all to the base model, through the same server;
* ``sequential``: mixed requests sent one at a time (the server then decodes one row per step);
* ``floor``: the same requests all to one adapter of rank ``--adapters`` × ``--rank`` (128): every
  decoding step then reads the same adapter bytes as a mixed step that uses all eight adapters,
  through the plain LoRA forward with no routing, which makes it the floor for ``mixed``;
* ``transformers``, ``transformers-cb`` (only if named in ``--workloads``): the base requests sent
  the same way to ``transformers serve`` (tried with ``transformers`` 5.25; it needs its ``serve``
  extras: fastapi, uvicorn, openai, pydantic), which this script starts on the model folder, on
  the CPU, with ``OMP_NUM_THREADS`` set to ``--threads``; ``-cb`` adds ``--continuous-batching``.

    python bench/serve.py                      # SmolLM2-135M-Instruct (peftkit fetch-model)
    python bench/serve.py --model DIR --threads 2 --rounds 2
    python bench/serve.py --workloads base,transformers,transformers-cb --rounds 1

Prompts are 64 random words, each one token, chosen so that their text tokenizes back into the
same 64 ids: peftkit gets the ids, ``transformers serve`` the text (its ``/v1/completions`` takes
no token ids). ``ignore_eos`` makes each of peftkit's answers exactly 64 tokens;
``transformers serve`` refuses that field, so its requests carry
``generation_config={"eos_token_id": -1}`` instead (no end token: it generates ``max_tokens``).
Tokens/s counts the tokens each server reports in its usage chunk, and each round's line shows them
and the prompt tokens. Note: without ``--continuous-batching``, ``transformers serve`` runs one
request at a time (``model.generate`` per request), so its requests queue behind each other.
With it, the KV cache is sized to the workload (``--cb-num-blocks``: one 256-token block per
request in flight, twice over): left to itself on the CPU it takes most of the free memory
(13.8 GB of a 23 GB machine).

Adapters: LoRA r 16 on all seven projections, random non-zero B, written once under the cache
(``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``). Every server is started before the first round and
each gets a warm-up; rounds alternate the order of the concurrent workloads so that a change in
machine load hits each of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import write_results  # noqa: E402

import peftkit  # noqa: E402
from peftkit.data import default_cache_dir  # noqa: E402
from peftkit.models import fetch_smollm2  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, n: int, rank: int) -> list[Path]:
    """``n`` LoRA adapters for the model (random A and B), written once and reused."""
    root = default_cache_dir() / "bench-serve" / f"{model_dir.name}-r{rank}"
    paths = [root / f"a{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    from transformers import AutoModelForCausalLM

    for i, p in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        cfg = peftkit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        peftkit.adapt(model, cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # A and B: B non-zero, so each adapter changes the text
                    param.copy_(torch.randn(param.shape, generator=g) * 0.02)
        peftkit.save_adapter(model, p)
    return paths


def make_prompts(model_dir: Path, n: int, length: int) -> list[tuple[list[int], str]]:
    """``n`` prompts of ``length`` random words, each one token with its leading space, as (ids,
    text), the text tokenizing back into exactly the ids (checked: a prompt that does not is drawn
    again)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = sorted(i for t, i in tok.get_vocab().items() if re.fullmatch("\u0120[a-z]+", t))
    g = torch.Generator().manual_seed(0)
    prompts: list[tuple[list[int], str]] = []
    while len(prompts) < n:
        ids = [words[j] for j in torch.randint(len(words), (length,), generator=g).tolist()]
        text = tok.decode(ids)
        if tok(text)["input_ids"] == ids:
            prompts.append((ids, text))
    return prompts


class Client:
    """The streaming client shared by the servers: ``port`` and ``proc`` are set by a subclass,
    ``extra`` holds the fields a server needs to generate exactly ``max_tokens``."""

    port: int
    proc: subprocess.Popen
    extra: dict[str, Any] = {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def request(
        self, model: str, prompt: list[int] | str, new: int
    ) -> tuple[float, float, int, int]:
        """One streamed completion: (seconds to the first chunk, total seconds, tokens, prompt
        tokens), the tokens as the server's usage chunk counts them."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": new,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        first = math.nan
        tokens = prompt_tokens = 0
        try:
            conn.request(
                "POST",
                "/v1/completions",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                if math.isnan(first):
                    first = time.perf_counter() - t0
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"the server failed the request: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                    prompt_tokens = int(chunk["usage"]["prompt_tokens"])
        finally:
            conn.close()
        return first, time.perf_counter() - t0, tokens, prompt_tokens


class Server(Client):
    """``peftkit serve`` with the adapters a0, a1, ... and the base model as ``base``."""

    extra = {"ignore_eos": True}

    def __init__(
        self,
        model_dir: Path,
        adapters: list[Path],
        threads: int,
        max_batch: int,
        floor: Path | None = None,
    ) -> None:
        self.log = Path(tempfile.mkstemp(prefix="peftkit-serve-", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        args = [f"--adapter=a{i}={p}" for i, p in enumerate(adapters)]
        if floor is not None:
            args.append(f"--adapter=floor={floor}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peftkit", "serve", "--model", str(model_dir), "--port", "0",
             "--threads", str(threads), "--max-batch", str(max_batch),
             "--served-model-name", "base", *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.2)
        self.stop()
        sys.exit(f"the server did not start:\n{self.log.read_text()}")


class TransformersServer(Client):
    """``transformers serve`` on the model folder (CPU, ``threads`` torch threads), on a free port.

    It takes no ``ignore_eos``: ``eos_token_id`` -1 (none) in the request's generation config makes
    it generate ``max_tokens``, with ``model.generate`` and with continuous batching alike."""

    extra = {"generation_config": json.dumps({"eos_token_id": -1})}

    def __init__(self, model_dir: Path, threads: int, cb_blocks: int | None) -> None:
        with socket.socket() as s:  # a free port, known before the server starts
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        cli = Path(sys.executable).with_name("transformers")
        cmd = [str(cli), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        if cb_blocks is not None:
            cmd += ["--continuous-batching", "--cb-num-blocks", str(cb_blocks)]
        self.command = " ".join(cmd)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.5)
        self.stop()
        sys.exit(f"transformers serve did not start ({self.command}):\n{self.log.read_text()}")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


WORKLOADS = ["mixed", "base", "sequential", "floor", "transformers", "transformers-cb"]


def run(
    server: Client, jobs: list[tuple[str, list[int] | str]], new: int, concurrency: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda j: server.request(j[0], j[1], new), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in res)
    ttft = [r[0] for r in res]
    return {
        "requests": len(jobs),
        "wall_s": wall,
        "tokens": tokens,
        "prompt_tokens": sum(r[3] for r in res),
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": pct(ttft, 99),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="a causal-LM folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--sequential-requests",
        type=int,
        default=16,
        help="requests in the one-at-a-time loop (a rate: fewer saves time) (16)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's torch threads (1: on a loaded 2-core machine, 2 threads were 4x slower)",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--workloads",
        default="mixed,base,sequential",
        help=f"comma-separated, of {', '.join(WORKLOADS)} (mixed,base,sequential)",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    workloads = args.workloads.split(",")
    if not workloads or any(w not in WORKLOADS for w in workloads):
        ap.error(f"--workloads takes names among {', '.join(WORKLOADS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(args.model) if args.model else fetch_smollm2()
    prompts = make_prompts(model_dir, args.requests, args.prompt_tokens)
    mixed = [(f"a{i % args.adapters}", ids) for i, (ids, _) in enumerate(prompts)]
    jobs: dict[str, list[tuple[str, list[int] | str]]] = {
        "mixed": mixed,
        "base": [("base", ids) for ids, _ in prompts],
        "sequential": mixed[: args.sequential_requests],
        "floor": [("floor", ids) for ids, _ in prompts],
        "transformers": [(str(model_dir), text) for _, text in prompts],
        "transformers-cb": [(str(model_dir), text) for _, text in prompts],
    }
    load = os.getloadavg()
    load_before = f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    print(
        f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f}; server threads {args.threads}",
        flush=True,
    )
    servers: dict[str, Client] = {}
    results: dict[str, list[dict[str, Any]]] = {w: [] for w in workloads}
    try:
        if {"mixed", "base", "sequential", "floor"} & set(workloads):
            adapters = make_adapters(model_dir, args.adapters, args.rank)
            floor = None
            if "floor" in workloads:
                floor = make_adapters(model_dir, 1, args.adapters * args.rank)[0]
            peft = Server(model_dir, adapters, args.threads, args.concurrency, floor)
            servers.update(mixed=peft, base=peft, sequential=peft, floor=peft)
        if "transformers" in workloads:
            servers["transformers"] = TransformersServer(model_dir, args.threads, None)
        if "transformers-cb" in workloads:
            # a block holds 256 tokens of every layer; twice the blocks the requests in flight fill
            per_request = math.ceil((args.prompt_tokens + args.new_tokens) / 256)
            blocks = 2 * args.concurrency * per_request
            servers["transformers-cb"] = TransformersServer(model_dir, args.threads, blocks)
        warmed: list[Client] = []
        for w in workloads:
            if servers[w] in warmed:
                continue
            if isinstance(servers[w], TransformersServer):
                print(f"{w}: {servers[w].command}", flush=True)
            warm = jobs["mixed" if w == "sequential" else w][: args.concurrency]
            run(servers[w], warm, 8, args.concurrency)  # warm-up
            warmed.append(servers[w])
        concurrent = [w for w in workloads if w != "sequential"]
        last = [w for w in workloads if w == "sequential"]
        for r in range(args.rounds):
            order = concurrent if r % 2 == 0 else concurrent[::-1]
            for w in order + last:
                n = 1 if w == "sequential" else args.concurrency
                results[w].append(run(servers[w], jobs[w], args.new_tokens, n))
                print(f"round {r} {w}: {json.dumps(results[w][-1])}", flush=True)
    finally:
        for server in dict.fromkeys(servers.values()):
            server.stop()
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    print()
    print("| workload | tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---|---|---|---|")
    for k, v in results.items():
        p50 = statistics.median(x["ttft_p50_s"] for x in v)
        p99 = statistics.median(x["ttft_p99_s"] for x in v)
        print(f"| {k} | {med[k]:.1f} | {p50:.2f} | {p99:.2f} |")
    for k, v in results.items():
        want = len(jobs[k]) * args.new_tokens
        if any(x["tokens"] != want for x in v):
            print(f"note: {k} generated {[x['tokens'] for x in v]} tokens, not {want}")
    print()
    # Note: rounds run a workload and the base back to back, so a per-round ratio pairs them
    # under the same machine load; its median is the steadier figure on a shared machine.
    paired = {
        k: [x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(v, results["base"], strict=True)]
        for k, v in results.items() if "base" in results and k != "base"
    }
    if "mixed" in med and "base" in med:
        rounds = " ".join(f"{q:.2f}" for q in paired["mixed"])
        print(f"mixed / base = {med['mixed'] / med['base']:.2f} (target >= 0.85); per round "
              f"{rounds}, median {statistics.median(paired['mixed']):.2f}")
    if "mixed" in med and "floor" in med:
        print(f"mixed / floor = {med['mixed'] / med['floor']:.2f} (1 = no cost beyond the bytes)")
    if "mixed" in med and "sequential" in med:
        print(f"mixed / sequential = {med['mixed'] / med['sequential']:.2f} (target >= 4)")
    for k in ("transformers", "transformers-cb"):
        if k in med and "base" in med:
            print(f"base / {k} = {med['base'] / med[k]:.2f}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    rows = []
    for k, v in results.items():
        rows.append({
            "workload": k,
            "tokens_per_s": med[k],
            "rounds_tokens_per_s": [round(x["tokens_per_s"], 2) for x in v],
            "ttft_p50_s": statistics.median(x["ttft_p50_s"] for x in v),
            "ttft_p99_s": statistics.median(x["ttft_p99_s"] for x in v),
            "ratio_to_base": med[k] / med["base"] if "base" in med else None,
            "rounds_ratio_to_base": [round(q, 4) for q in paired[k]] if k in paired else None,
        })
    write_results(
        "serve", rows,
        units={"tokens_per_s": "output tokens/s, median over rounds",
               "ratio_to_base": "tokens/s / base workload's tokens/s (same server, same run)",
               "rounds_ratio_to_base": "the same, per round (the base ran in the same round)"},
        notes=f"{args.requests} requests of {args.prompt_tokens}+{args.new_tokens} tokens, "
              f"{args.concurrency} at a time; {args.adapters} adapters r {args.rank}; server "
              f"threads {args.threads}; load before {load_before}, after "
              f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
    )


if __name__ == "__main__":
    main()
