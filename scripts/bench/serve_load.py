"""`eetune serve` under load: concurrent clients on loopback, one round per decoding mode, side by side.

The server runs as a subprocess (`python -m eetune.cli serve ...`) on SmolLM2, optionally with
a run dir's exits, so clients and server do not share a GIL. Each of `--clients` clients sends
`--requests` streamed chat completions one after another (greedy, `--max-tokens` new tokens,
prompts from the bundled distill prompts); the next mode's round starts when all clients are
done. Per mode: latency and time to first token (p50/p95), throughput (requests/s and
completion tokens/s over the round's wall time), errors, and the server's own statistics
(decode tokens/s per request, mean layers, draft acceptance, time queued). The server
decodes one request at a time, so under load latency grows with the queue while throughput
stays that of one decoding stream.

    .venv/bin/python scripts/bench/serve_load.py [--clients 8] [--requests 16] [--max-tokens 64]
        [--run-dir DIR] [--modes full,early_exit,self_speculative] [--threshold 0.8]
        [--draft-exit L] [--draft-len 4] [--dtype float32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    REPO_ROOT,
    machine_info,
    make_console,
    now_iso,
    print_table,
    write_json,
)

from eetune.stages.distill import DEFAULT_PROMPTS, read_prompts  # noqa: E402

SERVER_START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 1800
MODES = ("full", "early_exit", "self_speculative")


@dataclass
class Outcome:
    """One request as its client saw it."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    server: dict[str, Any] = field(default_factory=dict)  # the closing chunk's early_exit statistics
    error: str | None = None


# --- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "eetune.cli", "serve",
        f"serve.port={port}", "serve.log_level=warning",
        f"serve.queue_size={args.clients * 2}", f"serve.max_tokens={max(args.max_tokens, 1)}",
        f"serve.default_max_tokens={max(args.max_tokens, 1)}", f"model.dtype={args.dtype}",
    ]
    if args.run_dir is not None:
        command.append(f"serve.run_dir={args.run_dir}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = log_path.open("w")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {SERVER_START_TIMEOUT_S} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the clients ------------------------------------------------------------------------------------


def early_exit_options(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"mode": mode}
    if mode == "early_exit":
        options["threshold"] = args.threshold
    if mode == "self_speculative":
        options["draft_len"] = args.draft_len
        if args.draft_exit is not None:
            options["draft_exit"] = args.draft_exit
    return options


def one_request(http: httpx.Client, prompt: str, options: dict[str, Any], max_tokens: int) -> Outcome:
    """A streamed chat completion: latency to [DONE], time to the first piece of text."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "early_exit": options,
    }
    start = time.perf_counter()
    outcome = Outcome(ok=False, latency_s=0.0)
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        outcome.ok = outcome.error is None
                        break
                    event = json.loads(data)
                    if "error" in event:
                        outcome.error = event["error"]["message"]
                        continue
                    for choice in event["choices"]:
                        if outcome.ttft_s is None and choice["delta"].get("content"):
                            outcome.ttft_s = time.perf_counter() - start
                        if choice["finish_reason"] is not None:
                            outcome.server = event["early_exit"]
                    if event.get("usage"):
                        outcome.completion_tokens = event["usage"]["completion_tokens"]
                else:
                    outcome.error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency_s = time.perf_counter() - start
    return outcome


def run_round(url: str, mode: str, prompts: list[str], args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    options = early_exit_options(mode, args)
    task = progress.add_task(mode, total=args.clients * args.requests)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
            for i in range(args.requests):
                prompt = prompts[(index * args.requests + i) % len(prompts)]
                outcome = one_request(http, prompt, options, args.max_tokens)
                with lock:
                    outcomes.append(outcome)
                progress.advance(task)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        list(pool.map(client, range(args.clients)))
    wall_s = time.perf_counter() - start
    return summarise(mode, options, outcomes, wall_s)


def summarise(mode: str, options: dict[str, Any], outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    tokens = sum(o.completion_tokens for o in ok)

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "mean": None, "max": None}
        array = np.asarray(values, dtype=float)
        return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
                "mean": float(array.mean()), "max": float(array.max())}

    def server_mean(key: str) -> float | None:
        values = [o.server[key] for o in ok if o.server.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "mode": mode,
        "early_exit": options,
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "error_messages": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "latency_s": stats([o.latency_s for o in ok]),
        "ttft_s": stats([o.ttft_s for o in ok if o.ttft_s is not None]),
        "server": {
            "decode_tokens_per_s_mean": server_mean("tokens_per_s"),
            "mean_layers_mean": server_mean("mean_layers"),
            "acceptance_rate_mean": server_mean("acceptance_rate"),
            "queue_s": stats([o.server["queue_s"] for o in ok if "queue_s" in o.server]),
        },
    }


# --- report ---------------------------------------------------------------------------------------------


def print_report(console: Console, cases: list[dict[str, Any]], settings: dict[str, Any], num_layers: int) -> None:
    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    base = next((c for c in cases if c["mode"] == "full" and c["tokens_per_s"] > 0), None)
    clients = [
        [c["mode"], str(c["requests"]), str(c["errors"]),
         fmt(c["latency_s"]["p50"]), fmt(c["latency_s"]["p95"]), fmt(c["ttft_s"]["p50"]), fmt(c["ttft_s"]["p95"]),
         fmt(c["requests_per_s"], 3), fmt(c["tokens_per_s"], 1),
         fmt(c["tokens_per_s"] / base["tokens_per_s"] if base else None)]
        for c in cases
    ]
    print_table(
        console,
        f"serve under load: {settings['clients']} clients x {settings['requests']} requests, "
        f"{settings['max_tokens']} new tokens, {settings['dtype']}",
        ["mode", "requests", "errors", "latency p50 s", "p95 s", "TTFT p50 s", "p95 s", "req/s", "tok/s", "x full"],
        clients,
        caption="latency: request sent to [DONE]; TTFT: to the first text; tok/s: completion tokens over the "
                "round's wall time; x full: tok/s against mode full",
    )
    server = [
        [c["mode"], fmt(c["server"]["decode_tokens_per_s_mean"], 1), f"{fmt(c['server']['mean_layers_mean'], 1)}",
         fmt(c["server"]["acceptance_rate_mean"]), fmt(c["server"]["queue_s"]["p50"]),
         fmt(c["server"]["queue_s"]["p95"])]
        for c in cases
    ]
    print_table(
        console,
        "server side: means of the responses' early_exit statistics",
        ["mode", "decode tok/s", f"mean layers (of {num_layers})", "acceptance", "queued p50 s", "p95 s"],
        server,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=16, help="requests per client (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--run-dir", type=Path, default=None, help="augment/tune run dir whose exits the server loads")
    parser.add_argument("--modes", default=None,
                        help="comma-separated decoding modes (default: full; all three with --run-dir)")
    parser.add_argument("--threshold", type=float, default=0.8, help="early_exit threshold (default 0.8)")
    parser.add_argument("--draft-exit", type=int, default=None, help="self_speculative drafting exit (default deepest)")
    parser.add_argument("--draft-len", type=int, default=4, help="self_speculative tokens per draft (default 4)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output dir (default {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    modes = args.modes.split(",") if args.modes else (list(MODES) if args.run_dir else ["full"])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    if any(m != "full" for m in modes) and args.run_dir is None:
        parser.error("early_exit and self_speculative need exits: pass --run-dir")
    if min(args.clients, args.requests, args.max_tokens) < 1:
        parser.error("--clients, --requests and --max-tokens must be >= 1")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(DEFAULT_PROMPTS)
    settings = {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                "dtype": args.dtype, "run_dir": str(args.run_dir) if args.run_dir else None, "modes": args.modes,
                "stream": True, "temperature": 0, "prompts": f"{DEFAULT_PROMPTS.name} ({len(prompts)}, round-robin)"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.out / "serve_load.server.log"
    machine = machine_info()
    console.print(f"[bold]serve load[/]: modes {', '.join(args.modes)}; {args.clients} clients x {args.requests} "
                  f"requests x {args.max_tokens} tokens; {machine['cpus_usable']} CPUs, "
                  f"load average {machine['load_average_1_5_15min'][0]:.1f}; server log {log_path}")
    started = time.perf_counter()
    process = start_server(args, port, log_path)
    try:
        with console.status("starting the server (loading the model)"):
            wait_until_up(url, process, log_path)
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:  # warm up every path once
            for mode in args.modes:
                warm = one_request(http, prompts[0], early_exit_options(mode, args), min(4, args.max_tokens))
                if not warm.ok:
                    raise SystemExit(f"warm-up request ({mode}) failed: {warm.error}")
        cases = []
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
        with progress:
            for mode in args.modes:
                cases.append(run_round(url, mode, prompts, args, progress))
                cases[-1]["health_after"] = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        stop_server(process)

    report = {
        "benchmark": "serve_load",
        "created": now_iso(),
        "wall_seconds": time.perf_counter() - started,
        "settings": settings,
        "machine": machine,
        "load_average_after": list(os.getloadavg()),
        "model": card,
        "cases": cases,
    }
    path = write_json(args.out / "serve_load.json", report)
    print_report(console, cases, settings, card["num_layers"])
    console.print(f"wrote {path}")
    return 1 if any(c["errors"] for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
