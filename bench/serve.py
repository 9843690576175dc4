"""Serving: one ``peftkit serve`` process with 8 adapters, 64 requests of 64 prompt + 64 new
tokens sent 16 at a time by this process (streamed, over 127.0.0.1). Reports output tokens/s and
time to first token (p50, p99) for:

* ``mixed``: request i names adapter i mod 8;
* ``base``: the same requests, all to the base model, through the same server;
* ``sequential``: mixed requests sent one at a time (the server then decodes one row per step).

    python bench/serve.py                      # SmolLM2-135M-Instruct (peftkit fetch-model)
    python bench/serve.py --model DIR --threads 2 --rounds 2

Prompts are token ids (random, fixed seed) so each is exactly 64 tokens; ``ignore_eos`` makes
each answer exactly 64 tokens. Adapters: LoRA r 16 on all seven projections, random non-zero B,
written once under the cache (``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``). Rounds alternate the
workloads so that a change in machine load hits each of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
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


class Server:
    def __init__(self, model_dir: Path, adapters: list[Path], threads: int, max_batch: int) -> None:
        self.log = Path(tempfile.mkstemp(prefix="peftkit-serve-", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        args = [f"--adapter=a{i}={p}" for i, p in enumerate(adapters)]
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def request(self, model: str, prompt: list[int], new: int) -> tuple[float, float, int]:
        """One streamed completion: (seconds to the first chunk, total seconds, tokens)."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": new,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        first = math.nan
        tokens = 0
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
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
        finally:
            conn.close()
        return first, time.perf_counter() - t0, tokens


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def run(
    server: Server, jobs: list[tuple[str, list[int]]], new: int, concurrency: int
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
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(args.model) if args.model else fetch_smollm2()
    adapters = make_adapters(model_dir, args.adapters, args.rank)
    cfg = json.loads((model_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg["vocab_size"])
    prompts = [
        torch.randint(vocab // 8, vocab - 1, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.requests)
    ]
    mixed = [(f"a{i % args.adapters}", p) for i, p in enumerate(prompts)]
    base = [("base", p) for p in prompts]
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f}; server threads {args.threads}",
        flush=True,
    )
    server = Server(model_dir, adapters, args.threads, args.concurrency)
    results: dict[str, list[dict[str, Any]]] = {"mixed": [], "base": [], "sequential": []}
    try:
        run(server, mixed[: args.concurrency], 8, args.concurrency)  # warm-up
        for r in range(args.rounds):
            order = ["mixed", "base"] if r % 2 == 0 else ["base", "mixed"]
            for name in order:
                jobs = mixed if name == "mixed" else base
                results[name].append(run(server, jobs, args.new_tokens, args.concurrency))
                print(f"round {r} {name}: {json.dumps(results[name][-1])}", flush=True)
            seq = mixed[: args.sequential_requests]
            results["sequential"].append(run(server, seq, args.new_tokens, 1))
            print(f"round {r} sequential: {json.dumps(results['sequential'][-1])}", flush=True)
    finally:
        server.stop()
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    print()
    print("| workload | tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---|---|---|---|")
    for k, v in results.items():
        p50 = statistics.median(x["ttft_p50_s"] for x in v)
        p99 = statistics.median(x["ttft_p99_s"] for x in v)
        print(f"| {k} | {med[k]:.1f} | {p50:.2f} | {p99:.2f} |")
    print(
        f"\nmixed / base = {med['mixed'] / med['base']:.2f} (target >= 0.85); "
        f"mixed / sequential = {med['mixed'] / med['sequential']:.2f} (target >= 4)"
    )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
