"""The service's memory and throughput: N adapters routed through one full model against N plugged copies,
and a bounded local load test of `/v1/score` with requests spread over many adapters against one adapter.

    python benchmarks/serve_load.py --model smollm2-135m --out /tmp/serve-load

Adapters here are the full model's own adapter blocks with seeded random changes, saved as adapter files of a
real bundle and uploaded through the HTTP API: memory and speed do not depend on what the weights learnt.
Memory is each setting's peak RSS in a fresh process, beside the weights' bytes (N plugged copies of the
built-in model at N = 32 would need about 17 GB, so above `--max-copies` only their weight bytes are given).
The load test runs on 127.0.0.1 only, with a fixed request count and a time cap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from offsite.arch import get_layers
from offsite.exchange.adapter import Adapter, extract
from offsite.exchange.bundle import read_manifest
from offsite.loading import load_model
from offsite.processes import in_fresh_process, peak_rss_mb
from offsite.service.client import start_server

PROMPTS = ["The old lighthouse stood at the edge of the harbour for more than a hundred years, and every evening the",
           "Farmers brought bread, cheese, apples and honey to the market in the square, and a man with a cart sold"]


def make_adapters(model: str, bundle: Path, out: Path, count: int) -> list[Path]:
    full = load_model(model)
    manifest = read_manifest(bundle)
    layers = list(manifest.plan.adapter)
    found = []
    for number in range(count):
        generator = torch.Generator().manual_seed(number)
        tensors = {i: {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in named.items()}
                   for i, named in extract(full, {i: i for i in layers}).items()}
        folder = out / f"adapter-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        Adapter(tensors, manifest.fingerprint, manifest.base_model, {"note": "random, for the load test"}).save(folder)
        found.append(folder)
    return found


def routed_memory(model: str, adapters: list[str]) -> dict:
    from offsite.exchange.adapter import load_adapter  # noqa: PLC0415 - in the fresh process
    from offsite.service.routing import MultiAdapterModel  # noqa: PLC0415 - in the fresh process

    multi = MultiAdapterModel(load_model(model))
    for path in adapters:
        multi.add(path, load_adapter(path))
    weights = sum(p.numel() * p.element_size() for p in multi.model.parameters())
    return {"peak_rss_mb": peak_rss_mb(), "weight_mb": weights / 1e6}


def plugged_memory(model: str, count: int) -> dict:
    """N plugged models as N loaded model folders hold them: each its own weights (loading one file N times would
    share its memory-mapped pages, which N different plugged models on disk do not)."""
    copies = [load_model(model) for _ in range(count)]
    with torch.no_grad():
        for copy in copies:
            for parameter in copy.parameters():
                parameter.data = parameter.data.clone()
    weights = sum(p.numel() * p.element_size() for m in copies for p in m.parameters())
    return {"peak_rss_mb": peak_rss_mb(), "weight_mb": weights / 1e6}


def memory_table(model: str, adapters: list[Path], counts: list[int], max_copies: int) -> list[dict]:
    full = load_model(model)
    full_mb = sum(p.numel() * p.element_size() for p in full.parameters()) / 1e6
    block_mb = sum(p.numel() * p.element_size() for i in (0, 1, len(get_layers(full)) - 2, len(get_layers(full)) - 1)
                   for p in get_layers(full)[i].parameters()) / 1e6
    rows = []
    for count in counts:
        routed = in_fresh_process(True, routed_memory, model, [str(p) for p in adapters[:count]])
        plugged = in_fresh_process(True, plugged_memory, model, count) if count <= max_copies else None
        rows.append({"adapters": count, "routed": routed, "plugged": plugged,
                     "plugged_weight_mb": count * full_mb, "full_model_mb": full_mb, "adapter_blocks_mb": block_mb})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def load_test(url: str, token: str, adapter_ids: list[str], requests: int, clients: int, cap_seconds: float) -> dict:
    """`requests` /v1/score calls from `clients` threads, adapters round robin; stops early at `cap_seconds`."""
    latencies: list[float] = []
    lock, counter = threading.Lock(), iter(range(requests))
    start = time.perf_counter()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            while time.perf_counter() - start < cap_seconds:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                body = {"adapter": adapter_ids[number % len(adapter_ids)], "prompt": PROMPTS[number % 2],
                        "continuations": [" sea", " town"]}
                sent = time.perf_counter()
                response = http.post("/v1/score", json=body)
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"adapters": len(adapter_ids), "requests": len(latencies), "clients": clients, "seconds": elapsed,
            "requests_per_second": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-copies", type=int, default=8, help="most plugged copies actually loaded")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cap-seconds", type=float, default=600)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--memory-only", action="store_true", help="measure memory, not the load test")
    args = parser.parse_args()
    out = args.out
    bundle = out / "bundles" / "uniform-8"
    if not bundle.exists():
        subprocess.run([sys.executable, "-m", "offsite.cli", "emulate", args.model, "-o", str(bundle)], check=True)
    adapters = make_adapters(args.model, bundle, out / "adapters", max(args.counts))
    report = {"memory": memory_table(args.model, adapters, args.counts, args.max_copies), "load": []}
    if args.memory_only:
        (out / "serve-memory.json").write_text(json.dumps(report, indent=2))
        return
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh service: the same adapters are uploaded again
    token = subprocess.run([sys.executable, "-m", "offsite.cli", "serve", "--state", str(state), "--add-customer",
                            "load"], check=True, capture_output=True, text=True).stdout.split()[-1]
    server = start_server(["--model", args.model, "--bundles", str(out / "bundles"), "--state", str(state),
                           "--max-batch", "16"], args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
            ids = []
            for folder in adapters[:8]:
                with open(folder / "adapter.safetensors", "rb") as w, open(folder / "adapter.json", "rb") as m:
                    response = http.post("/adapters", params={"bundle": bundle.name},
                                         files={"weights": ("adapter.safetensors", w), "metadata": ("adapter.json", m)})
                response.raise_for_status()
                ids.append(response.json()["id"])
        for spread in (ids[:1], ids):
            report["load"].append(load_test(url, token, spread, args.requests, args.clients, args.cap_seconds))
            print(json.dumps(report["load"][-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    (out / "serve-load.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
