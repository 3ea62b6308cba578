"""`kagent serve` benchmark: latency and throughput at 1/4/8 concurrent clients, the server's overhead over bare
`generate`, and a soak with a concurrent `kagent watch` commit.

    python scripts/serve_bench.py --workspace WS [--seconds 30] [--clients 1,4,8] [--max-tokens 24]
                                  [--soak-seconds 60] [--soak-clients 8] [--feed FEED] [--json out.json]

The server runs as `kagent serve` in a child process on 127.0.0.1; the clients are threads here, each sending
completion requests (greedy, `--max-tokens` new tokens, fact prompts from examples/feed.jsonl and a few others)
back to back for `--seconds`. Reported per client count: requests, errors, latency p50/p95 (client-measured,
whole response) and completion tokens/s over the window.

Overhead: the same prompts, one at a time, through the server (1 client) against `model.generate` on a model
loaded here with the same committed edits (`kagent ask`'s `load_edits`) and the same greedy settings; medians of
`--overhead-rounds` rounds per prompt (the two are never run at once).

Soak: `--soak-clients` clients for at least `--soak-seconds`; with `--feed`, a `kagent watch FEED --once` child
starts with the soak (the soak then lasts until the watch has finished plus 15 s). Checked: zero errors, every
response names a batch (X-Kagent-Batch), and every response to the same prompt under the same batch has the same
text (greedy: a response generated under half a batch, or under a batch it does not name, would differ). For each
fact the watch commits, the seconds from its batch's commit (ledger) to /health naming the batch, and to the first
response that answers its target (which includes the wait behind the requests already queued).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

try:
    import httpx2 as httpx
except ImportError:
    import httpx
import torch

from agent.cli import load_edits
from agent.workspace import Workspace
from editors.models import load_model
from memory.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
EXTRA_PROMPTS = ["The capital of France is", "Water is made of", "The largest planet in the solar system is",
                 "The author of Hamlet is"]


def feed_prompts(path: Path, n: int) -> list[dict]:
    """(prompt, target) of the feed's first `n` facts."""
    out = []
    for line in path.read_text().splitlines()[:n]:
        rec = json.loads(line)
        out.append({"prompt": rec["prompt"].replace("{}", rec["subject"]), "target": rec["target"]})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws: Path, port: int, max_tokens: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--workspace", str(ws), "--port", str(port),
                             "--max-tokens", str(max(max_tokens, 64)), "--max-waiting", "64", "--queue-timeout",
                             "600"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kagent serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("kagent serve did not start within 10 minutes")


class Client:
    """Sends completion requests back to back until `stop`; records every response."""

    def __init__(self, url: str, model: str, prompts: list[str], max_tokens: int, offset: int):
        self.url, self.model, self.prompts, self.max_tokens, self.i = url, model, prompts, max_tokens, offset
        self.records: list[dict] = []

    def run(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=900) as http:
            while not stop.is_set():
                prompt = self.prompts[self.i % len(self.prompts)]
                self.i += 1
                self.records.append(ask(http, self.url, self.model, prompt, self.max_tokens))


def ask(http, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.time()
    try:
        r = http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens})
        body = r.json()
        ok = r.status_code == 200
        return {"prompt": prompt, "start": t0, "end": time.time(), "ok": ok, "status": r.status_code,
                "batch": r.headers.get("x-kagent-batch"), "text": body["choices"][0]["text"] if ok else None,
                "tokens": body["usage"]["completion_tokens"] if ok else 0, "error": None if ok else body}
    except Exception as exc:  # a failed request is an error to count, not the end of the benchmark
        return {"prompt": prompt, "start": t0, "end": time.time(), "ok": False, "status": None, "batch": None,
                "text": None, "tokens": 0, "error": repr(exc)}


def load(url: str, model: str, prompts: list[str], clients: int, seconds: float, max_tokens: int,
         until=None) -> tuple[list[dict], float]:
    """`clients` clients for `seconds` (and until `until()` is true, when given); all records and the window."""
    stop = threading.Event()
    workers = [Client(url, model, prompts, max_tokens, k) for k in range(clients)]
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    t0 = time.time()
    for t in threads:
        t.start()
    while time.time() - t0 < seconds or (until is not None and not until()):
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    return [r for w in workers for r in w.records], time.time() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def summary(records: list[dict], window: float) -> dict:
    lat = [r["end"] - r["start"] for r in records if r["ok"]]
    return {"requests": len(records), "errors": sum(not r["ok"] for r in records),
            "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3),
            "tokens_per_s": round(sum(r["tokens"] for r in records) / window, 2), "window_s": round(window, 1)}


def edited_model(ws: Workspace):
    """The workspace's model loaded here with the committed edits (as `kagent ask` loads them) and its memory."""
    cfg = ws.config()
    loaded = load_model(cfg.model, **cfg.load_options())
    with Ledger(ws.ledger_dir) as ledger:
        memory = load_edits(ledger, loaded)
    return loaded, memory


@torch.no_grad()
def bare_seconds(loaded, prompt: str, max_tokens: int) -> float:
    tok, model = loaded.tok, loaded.model
    x = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    model.generate(**x, max_new_tokens=max_tokens, do_sample=False, eos_token_id=model.generation_config.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0


def overhead(url: str, model: str, ws: Workspace, prompts: list[str], max_tokens: int, rounds: int) -> dict:
    """Per prompt, the median of `rounds` served (1 client, whole response) and bare `generate` times, the two
    alternated request by request so that changing load from other processes falls on both alike."""
    loaded, memory = edited_model(ws)
    served: dict[str, list[float]] = {p: [] for p in prompts}
    bare: dict[str, list[float]] = {p: [] for p in prompts}
    with httpx.Client(timeout=900) as http, memory.attached(loaded.model) if memory else nullcontext():
        for _ in range(rounds):
            for p in prompts:
                r = ask(http, url, model, p, max_tokens)
                served[p].append(r["end"] - r["start"])
                bare[p].append(bare_seconds(loaded, p, max_tokens))
    per = {p: {"served_s": round(statistics.median(served[p]), 4), "bare_s": round(statistics.median(bare[p]), 4)}
           for p in prompts}
    total_s, total_b = sum(v["served_s"] for v in per.values()), sum(v["bare_s"] for v in per.values())
    return {"prompts": per, "served_total_s": round(total_s, 3), "bare_total_s": round(total_b, 3),
            "overhead": round(total_s / total_b - 1, 4)}


def consistency(records: list[dict]) -> dict:
    """Every response names a batch; same prompt + same batch -> same text."""
    texts: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if r["ok"]:
            texts.setdefault((r["prompt"], r["batch"]), set()).add(r["text"])
    split = [k for k, v in texts.items() if len(v) > 1]
    return {"unnamed": sum(r["ok"] and not r["batch"] for r in records), "prompt_batch_pairs": len(texts),
            "inconsistent_pairs": len(split), "batches_seen": sorted({r["batch"] for r in records if r["batch"]},
                                                                     key=lambda b: int(b))}


def live_times(ws: Workspace, records: list[dict], since: float, switches: list[tuple[float, int]]) -> list[dict]:
    """Per fact the watch committed during the soak: seconds from its batch's commit (ledger) to /health naming
    the batch (the server holds the edits), and to the first response that answers its target (that includes
    waiting in the queue behind the requests admitted before)."""
    with Ledger(ws.ledger_dir) as ledger:
        batches = {b.id: b.created_at for b in ledger.history() if b.status == "committed" and b.created_at > since}
        applied = [f for f in ledger.facts(status="applied") if f.batch_id in batches]
    out = []
    for f in applied:
        prompt = f.record.prompt.replace("{}", f.record.subject)
        committed = batches[f.batch_id]
        named = [t for t, b in switches if b >= f.batch_id and t >= committed]
        hits = [r["end"] for r in records if r["ok"] and r["prompt"] == prompt and r["end"] > committed
                and r["text"].strip().startswith(f.record.target)]
        out.append({"fact": prompt, "target": f.record.target, "batch": f.batch_id,
                    "seconds_to_health": round(min(named) - committed, 2) if named else None,
                    "seconds_to_answer": round(min(hits) - committed, 2) if hits else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--overhead-rounds", type=int, default=3)
    ap.add_argument("--soak-seconds", type=float, default=60.0)
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--feed", type=Path, help="facts a `kagent watch --once` child commits during the soak")
    ap.add_argument("--parts", default="overhead,load,soak", help="which measurements to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ws = Workspace.open(args.workspace)
    facts = feed_prompts(args.feed, 10**6) if args.feed else []
    prompts = [f["prompt"] for f in feed_prompts(ROOT / "examples" / "feed.jsonl", 4)] + EXTRA_PROMPTS
    prompts += [f["prompt"] for f in facts if f["prompt"] not in prompts]
    port = free_port()
    server = start_server(args.workspace, port, args.max_tokens)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"cores": os.cpu_count(), "max_tokens": args.max_tokens, "prompts": len(prompts)}
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        parts = args.parts.split(",")
        if "overhead" in parts:
            result["overhead"] = overhead(url, model, ws, prompts[:8], args.max_tokens, args.overhead_rounds)
            print(json.dumps({"overhead": result["overhead"]}), flush=True)
        result["load"] = {}
        for c in [int(x) for x in args.clients.split(",")] if "load" in parts else []:
            records, window = load(url, model, prompts, c, args.seconds, args.max_tokens)
            result["load"][c] = summary(records, window) | consistency(records)
            print(json.dumps({f"{c} clients": result["load"][c]}), flush=True)
        if "soak" in parts:
            result["soak"] = soak(args, url, model, ws, prompts)
            print(json.dumps({"soak": result["soak"]}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def soak(args, url: str, model: str, ws: Workspace, prompts: list[str]) -> dict:
    """`--soak-clients` clients while a `kagent watch` child (with `--feed`) commits; see the module docstring."""
    since = time.time()
    log = (args.json or Path("serve_bench")).with_suffix(".watch.log")
    watch = subprocess.Popen([sys.executable, "-m", "agent", "watch", str(args.feed), "--once", "--workspace",
                              str(args.workspace)], stdout=log.open("w"), stderr=subprocess.STDOUT
                             ) if args.feed else None
    finished: list[float] = []

    def watch_done() -> bool:
        """No watch, or it finished 15 s ago (so a response after its last commit is in the soak)."""
        if watch is None:
            return True
        if watch.poll() is None:
            return False
        finished[:] = finished or [time.time()]
        return time.time() - finished[0] >= 15

    switches: list[tuple[float, int]] = []  # (time, batch) whenever /health names a new batch
    stop = threading.Event()
    health = threading.Thread(target=watch_health, args=(url, switches, stop))
    health.start()
    records, window = load(url, model, prompts, args.soak_clients, args.soak_seconds, args.max_tokens, watch_done)
    stop.set()
    health.join()
    out = summary(records, window) | consistency(records)
    if watch is not None:
        out["watch"] = log.read_text().strip().splitlines()[-1:]
        out["live"] = live_times(ws, records, since, switches)
    return out


def watch_health(url: str, switches: list[tuple[float, int]], stop: threading.Event) -> None:
    """Record when /health (answered at once, beside the queue) names a new batch."""
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            batch = http.get(url + "/health").json()["batch"]
            if not switches or switches[-1][1] != batch:
                switches.append((time.time(), batch))
            time.sleep(0.1)


if __name__ == "__main__":
    main()
