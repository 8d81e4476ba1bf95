"""`eetune serve` under load: the one-at-a-time server against continuous batching (issue 16).

For each server setting in `--max-batch-sizes` (default `1,8`) one server subprocess runs
(`python -m eetune.cli serve serve.max_batch_size=N ...`, SmolLM2, optionally with a run dir's
exits; clients and server do not share a GIL) and is reused for every mode and concurrency
level: `serve.max_batch_size=1` decodes one request at a time in arrival order, `8` lets up to
eight requests of one mode (and exit settings) decode together. Against each server, for each
`--concurrency` level (default `1,2,4,8,16` concurrent streaming clients) and each mode in
`--modes`, every client sends `--requests` streamed chat completions one after another (greedy,
`--max-tokens` new tokens, prompts from the bundled distill prompts); the next round starts
when all clients are done. Every (concurrency, mode, max_batch_size) round gives one row:
completion tokens/s and requests/s over the round's wall time, latency and time to first token
(p50/p95), errors, the server's own statistics (decode tokens/s per request, mean layers, draft
acceptance, time queued), and two ratios:

- `x mbs=1`: tokens/s and p95 latency against the same mode and concurrency on the first
  server of `--max-batch-sizes` (the one-at-a-time server with the default `1,8`);
- `x full`: tokens/s against mode `full` at the same concurrency on the same server.

Writes serve_load.json (settings, machine_info, every row), serve_load.png (tokens/s and p95
latency against concurrency, one line per mode and max_batch_size) and the server logs under
`--out`, and prints the tables. float32 by default: on CPUs with AVX2 but no bf16 units a bf16
matmul gets slower per row as rows are added, which would hide what batching buys.

    .venv/bin/python scripts/bench/serve_load.py [--concurrency 1,2,4,8,16] [--max-batch-sizes 1,8]
        [--requests 4] [--max-tokens 64] [--run-dir DIR] [--modes full,early_exit,self_speculative]
        [--threshold 0.8] [--draft-exit L] [--draft-len 4] [--draft-schedule constant|adaptive] [--dtype float32]
        [--out DIR]

e.g. all three modes on a tuned run's exits:

    .venv/bin/python scripts/bench/serve_load.py --run-dir runs/smollm2_135m --out runs/bench
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

from eetune.rundir import atomic_write  # noqa: E402
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


def start_server(args: argparse.Namespace, max_batch_size: int, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "eetune.cli", "serve",
        f"serve.port={port}", "serve.log_level=warning", f"serve.max_batch_size={max_batch_size}",
        f"serve.queue_size={max(args.concurrency) * 2}", f"serve.max_tokens={max(args.max_tokens, 1)}",
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
        options["draft_schedule"] = args.draft_schedule
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


def run_round(
    url: str, mode: str, clients: int, prompts: list[str], args: argparse.Namespace, progress: Progress, label: str
) -> dict[str, Any]:
    options = early_exit_options(mode, args)
    task = progress.add_task(label, total=clients * args.requests)
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
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
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


# --- comparisons, report, plot ---------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def add_ratios(cases: list[dict[str, Any]], baseline_max_batch_size: int) -> None:
    """Each row against the baseline server (same mode and concurrency) and against `full`
    (same concurrency and server); None where the other row is missing or measured nothing."""
    by_key = {(c["concurrency"], c["mode"], c["max_batch_size"]): c for c in cases}
    for c in cases:
        base = by_key.get((c["concurrency"], c["mode"], baseline_max_batch_size))
        c["vs_baseline_server"] = {
            "max_batch_size": baseline_max_batch_size,
            "tokens_per_s": _ratio(c["tokens_per_s"], base["tokens_per_s"]) if base else None,
            "latency_p95": _ratio(c["latency_s"]["p95"], base["latency_s"]["p95"]) if base else None,
            "ttft_p95": _ratio(c["ttft_s"]["p95"], base["ttft_s"]["p95"]) if base else None,
        }
        full = by_key.get((c["concurrency"], "full", c["max_batch_size"]))
        c["vs_full_tokens_per_s"] = _ratio(c["tokens_per_s"], full["tokens_per_s"]) if full else None


def _sorted(cases: list[dict[str, Any]], modes: list[str], max_batch_sizes: list[int]) -> list[dict[str, Any]]:
    return sorted(cases, key=lambda c: (c["concurrency"], modes.index(c["mode"]),
                                        max_batch_sizes.index(c["max_batch_size"])))


def print_report(console: Console, cases: list[dict[str, Any]], settings: dict[str, Any], num_layers: int) -> None:
    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    base = settings["max_batch_sizes"][0]
    cases = _sorted(cases, settings["modes"], settings["max_batch_sizes"])
    rows = [
        [str(c["concurrency"]), c["mode"], str(c["max_batch_size"]), f"{c['errors']}/{c['requests']}",
         fmt(c["tokens_per_s"], 1), fmt(c["requests_per_s"], 3),
         fmt(c["latency_s"]["p50"]), fmt(c["latency_s"]["p95"]), fmt(c["ttft_s"]["p50"]), fmt(c["ttft_s"]["p95"]),
         times(c["vs_baseline_server"]["tokens_per_s"]), times(c["vs_baseline_server"]["latency_p95"]),
         times(c["vs_full_tokens_per_s"])]
        for c in cases
    ]
    print_table(
        console,
        f"serve under load: {settings['requests']} requests per client, {settings['max_tokens']} new tokens, "
        f"greedy, {settings['dtype']}",
        ["conc", "mode", "mbs", "err", "tok/s", "req/s", "lat\np50 s", "lat\np95 s", "TTFT\np50 s", "TTFT\np95 s",
         f"tok/s\nvs mbs{base}", f"p95\nvs mbs{base}", "tok/s\nvs full"],
        rows,
        caption="conc: concurrent streaming clients; mbs: the server's serve.max_batch_size; err: failed/sent "
                "requests; tok/s, req/s: completion tokens and requests over the round's wall time; lat: request "
                f"sent to [DONE]; TTFT: to the first text; vs mbs{base}: against the same mode and conc on the "
                f"max_batch_size={base} server; vs full: against mode full, same conc and server",
        left_columns=3,
    )
    server = [
        [str(c["concurrency"]), c["mode"], str(c["max_batch_size"]),
         fmt(c["server"]["decode_tokens_per_s_mean"], 1), f"{fmt(c['server']['mean_layers_mean'], 1)}",
         fmt(c["server"]["acceptance_rate_mean"]), fmt(c["server"]["queue_s"]["p50"]),
         fmt(c["server"]["queue_s"]["p95"])]
        for c in cases
    ]
    print_table(
        console,
        "server side: means of the responses' early_exit statistics",
        ["conc", "mode", "mbs", "decode tok/s", f"mean layers (of {num_layers})", "acceptance",
         "queued p50 s", "p95 s"],
        server,
        left_columns=3,
    )


def plot(cases: list[dict[str, Any]], settings: dict[str, Any], out: Path) -> Path:
    """Two panels against concurrency: total tokens/s and p95 latency, a line per (mode, max_batch_size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_p95) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"full": "tab:blue", "early_exit": "tab:orange", "self_speculative": "tab:green"}
    styles = ["--", "-", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for mode in settings["modes"]:
        for i, mbs in enumerate(settings["max_batch_sizes"]):
            line = sorted((c for c in cases if c["mode"] == mode and c["max_batch_size"] == mbs),
                          key=lambda c: c["concurrency"])
            if not line:
                continue
            style = {"color": colours.get(mode), "linestyle": styles[i % len(styles)],
                     "marker": markers[i % len(markers)],
                     "label": f"{mode}, max_batch_size={mbs}"}
            x = [c["concurrency"] for c in line]
            ax_tps.plot(x, [c["tokens_per_s"] for c in line], **style)
            ax_p95.plot(x, [np.nan if c["latency_s"]["p95"] is None else c["latency_s"]["p95"] for c in line],
                        **style)
    levels = settings["concurrency"]
    for ax, ylabel in ((ax_tps, "completion tokens/s (all clients)"), (ax_p95, "latency p95 (s)")):
        if len(levels) > 1 and min(levels) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_tps.set_title("throughput")
    ax_p95.set_title("p95 latency")
    ax_tps.legend(fontsize=7)
    fig.suptitle(f"eetune serve: {settings['requests']} requests per client x {settings['max_tokens']} tokens, "
                 f"{settings['dtype']}", fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16],
                        help="comma-separated numbers of concurrent streaming clients (default 1,2,4,8,16)")
    parser.add_argument("--max-batch-sizes", type=_int_list, default=[1, 8],
                        help="comma-separated serve.max_batch_size settings, one server each; the first is "
                             "the baseline of the ratios (default 1,8)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--run-dir", type=Path, default=None, help="augment/tune run dir whose exits the server loads")
    parser.add_argument("--modes", default=None,
                        help="comma-separated decoding modes (default: full; all three with --run-dir)")
    parser.add_argument("--threshold", type=float, default=0.8, help="early_exit threshold (default 0.8)")
    parser.add_argument("--draft-exit", type=int, default=None, help="self_speculative drafting exit (default deepest)")
    parser.add_argument("--draft-len", type=int, default=4, help="self_speculative tokens per draft (default 4)")
    parser.add_argument("--draft-schedule", default="constant", choices=["constant", "adaptive"],
                        help="self_speculative draft schedule (default constant)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output dir (default {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    modes = args.modes.split(",") if args.modes else (list(MODES) if args.run_dir else ["full"])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    if any(m != "full" for m in modes) and args.run_dir is None:
        parser.error("early_exit and self_speculative need exits: pass --run-dir")
    if not args.concurrency or not args.max_batch_sizes:
        parser.error("--concurrency and --max-batch-sizes need at least one value")
    if min(*args.concurrency, *args.max_batch_sizes, args.requests, args.max_tokens) < 1:
        parser.error("--concurrency, --max-batch-sizes, --requests and --max-tokens must be >= 1")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    args.max_batch_sizes = list(dict.fromkeys(args.max_batch_sizes))
    args.modes = list(dict.fromkeys(modes))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(DEFAULT_PROMPTS)
    settings = {"concurrency": args.concurrency, "max_batch_sizes": args.max_batch_sizes,
                "requests_per_client": args.requests, "requests": args.requests, "max_tokens": args.max_tokens,
                "dtype": args.dtype, "run_dir": str(args.run_dir) if args.run_dir else None, "modes": args.modes,
                "threshold": args.threshold, "draft_exit": args.draft_exit, "draft_len": args.draft_len,
                "draft_schedule": args.draft_schedule, "queue_size": max(args.concurrency) * 2, "stream": True, "temperature": 0,
                "prompts": f"{DEFAULT_PROMPTS.name} ({len(prompts)}, round-robin)"}
    machine = machine_info()
    console.print(f"[bold]serve load[/]: servers max_batch_size {', '.join(map(str, args.max_batch_sizes))}; "
                  f"modes {', '.join(args.modes)}; {', '.join(map(str, args.concurrency))} clients x "
                  f"{args.requests} requests x {args.max_tokens} tokens; {machine['cpus_usable']} CPUs, "
                  f"load average {machine['load_average_1_5_15min'][0]:.1f}")
    started = time.perf_counter()
    cases: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    card: dict[str, Any] = {}
    for max_batch_size in args.max_batch_sizes:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = args.out / f"serve_load.server.mbs{max_batch_size}.log"
        console.print(f"server max_batch_size={max_batch_size}: log {log_path}")
        server_started = time.perf_counter()
        process = start_server(args, max_batch_size, port, log_path)
        try:
            with console.status(f"starting the server max_batch_size={max_batch_size} (loading the model)"):
                wait_until_up(url, process, log_path)
            card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:  # warm up every path once
                for mode in args.modes:
                    warm = one_request(http, prompts[0], early_exit_options(mode, args), min(4, args.max_tokens))
                    if not warm.ok:
                        raise SystemExit(f"warm-up request ({mode}, max_batch_size={max_batch_size}) "
                                         f"failed: {warm.error}")
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console)
            with progress:
                for clients in args.concurrency:
                    for mode in args.modes:
                        label = f"mbs={max_batch_size} clients={clients} {mode}"
                        case = run_round(url, mode, clients, prompts, args, progress, label)
                        case.update(concurrency=clients, max_batch_size=max_batch_size,
                                    load_average_after=list(os.getloadavg()))
                        case["health_after"] = httpx.get(f"{url}/health", timeout=10).json()
                        cases.append(case)
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            stop_server(process)
        servers.append({"max_batch_size": max_batch_size, "log": log_path.name, "health_at_end": health,
                        "wall_seconds": time.perf_counter() - server_started})

    add_ratios(cases, args.max_batch_sizes[0])
    cases = _sorted(cases, args.modes, args.max_batch_sizes)
    report = {
        "benchmark": "serve_load",
        "created": now_iso(),
        "wall_seconds": time.perf_counter() - started,
        "settings": settings,
        "machine": machine,
        "load_average_after": list(os.getloadavg()),
        "model": card,
        "servers": servers,
        "cases": cases,
    }
    path = write_json(args.out / "serve_load.json", report)
    png = plot(cases, settings, args.out / "serve_load.png")
    print_report(console, cases, settings, card["num_layers"])
    console.print(f"wrote {path} and {png}")
    return 1 if any(c["errors"] for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
