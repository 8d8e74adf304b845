"""The router's runtime (ONNX int8, no torch) against the Transformers pipeline in PyTorch,
the way the endpoint serves today: cold start, latency through the library and over HTTP,
throughput at batch 32 and peak RSS, each engine in fresh processes, side by side,
and the runtime on the fp32 graph of the same artifact.
Latencies pool the same 300 tickets of every run (3 processes and 3 servers per
engine, after 20 warm-up tickets each). Over HTTP the tickets go through a minimal
keep-alive client (bench/serving.py), and through Python's http.client in blocks between
(that client's own work costs 0.11 to 0.13 ms a request: not the server's).
Then the cost of the out-of-scope score: batch-1 latency through the library with
the score (graph with its features output, Mahalanobis distance) and without it
(the same graph stripped of that output), interleaved ticket by ticket.

Uses the BANKING77 model exported by `make bench-export`, and for the
out-of-scope score the model of `make bench-routing`. Run: make bench-runtime
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
from serving import MinimalClient, StdlibClient, free_port, wait_for_ping

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "bench" / "banking77"
DATA = REPO.parent / "shared" / "data" / "banking77"
# the benchmark's clients: the minimal one times the server; http.client, the client of
# earlier runs, is timed beside it (0.11 to 0.13 ms more CPU a request on the client's side)
CLIENTS = {"minimal": MinimalClient, "http.client": StdlibClient}
PARTS = ("http", "ping", "cpu", "app", "predict")
ENGINES = {  # key: name; "served" is the graph the runtime picks for this CPU
    "served": "gata-ft runtime (ONNX int8)",
    "fp32": "gata-ft runtime, fp32 graph",
    "pipeline": "Transformers pipeline (PyTorch fp32)",
}

# One process per measurement; it reports when its first prediction is done.
CHILD = r"""
import json, resource, sys, time
engine, folder, texts_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = json.load(open(texts_file))
if engine != "pipeline":
    from gata_ft.runtime import Model
    # a router's process owns its sessions, as the server's does: one onnxruntime pool
    model = Model.load(folder, graph="fp32" if engine == "fp32" else "serve", threads=threads,
                       shared_threads=True)
    predict = lambda batch: model.predict(batch)
    predict_one = lambda text: model.predict([text])
else:
    import torch
    torch.set_num_threads(threads)
    from transformers import pipeline
    pipe = pipeline("text-classification", model=folder, device="cpu")
    predict = lambda batch: pipe(batch, batch_size=len(batch))
    predict_one = lambda text: pipe(text)  # a string, as the baseline server calls it
predict([texts[0]])
print("ready", flush=True)
for text in texts[300:320]:  # warm-up: the first calls of each input length are slower
    predict_one(text)
single = []
for text in texts[:300]:
    t = time.perf_counter(); predict_one(text); single.append(time.perf_counter() - t)
batches = [texts[i:i + 32] for i in range(0, 32 * 40, 32)]
t = time.perf_counter()
for batch in batches:
    predict(batch)
throughput = 32 * len(batches) / (time.perf_counter() - t)
print(json.dumps({"single": single, "throughput": throughput,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PIPELINE_SERVER = r"""
import sys, torch, uvicorn
from fastapi import FastAPI, Request
from transformers import pipeline
torch.set_num_threads(int(sys.argv[3]))
pipe = pipeline("text-classification", model=sys.argv[1], device="cpu")
app = FastAPI()
@app.get("/ping")
def ping(): return {}
@app.post("/invocations")
async def invocations(request: Request):
    out = pipe((await request.json())["text"])[0]
    return {"prediction": {"label": out["label"], "probability": out["score"]}}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORK / "export-avx2.tar.gz")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=3, help="cold starts per engine")
    parser.add_argument(
        "--scope-model",
        type=Path,
        default=REPO / "build/bench/routing/banking77-oos-seed0/job-split/model/model.tar.gz",
    )
    parser.add_argument("--scope-only", action="store_true", help="only the scope overhead")
    args = parser.parse_args()
    print(describe())
    if args.scope_only:
        texts = [json.loads(line)["text"] for line in (DATA / "test" / "data.json").open()]
        print(scope_overhead(args.scope_model, texts, args.threads))
        return
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run `make bench-export` first")
    from gata_ft.archive import safe_extract

    texts = [json.loads(line)["text"] for line in (DATA / "test" / "data.json").open()]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"  # as SageMaker extracts model.tar.gz
        safe_extract(args.model, folder)
        texts_file = Path(scratch) / "texts.json"
        texts_file.write_text(json.dumps(texts[:1500]))
        # the engines take turns, run after run, in a rotating order, so that the
        # machine's drift (a shared host) and a cold page cache fall on each alike
        cold, runs, http = ({key: [] for key in ENGINES} for _ in range(3))
        for run in range(args.runs):
            order = list(ENGINES)[run % len(ENGINES) :] + list(ENGINES)[: run % len(ENGINES)]
            for key in order:
                command = [sys.executable, "-c", CHILD, key, str(folder), str(texts_file),
                           str(args.threads)]  # fmt: skip
                started = time.perf_counter()
                child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                         stderr=subprocess.DEVNULL)  # fmt: skip
                assert child.stdout.readline().strip() == "ready"
                cold[key].append(time.perf_counter() - started)
                runs[key].append(json.loads(child.stdout.readline()))
                child.wait()
                # the library's tickets, after the same warm-up, one server per run
                http[key].append(http_latencies(key, folder, texts[:320], args.threads))
            print(f"run {run + 1} of {args.runs} measured", file=sys.stderr, flush=True)
        for key, engine in ENGINES.items():
            # every run's 300 tickets: one process's p50 moves by 0.1 ms from run to run
            single = np.concatenate([r["single"] for r in runs[key]]) * 1000
            timed = {part: np.concatenate([h[part] for h in http[key]]) for part in http[key][0]}
            mine = {part: timed[f"minimal {part}"] for part in PARTS}  # the table's figures
            results[engine] = {
                "cold_start_s": float(np.median(cold[key])),
                "b1_p50_ms": float(np.percentile(single, 50)),
                "b1_p95_ms": float(np.percentile(single, 95)),
                "http_p50_ms": float(np.percentile(mine["http"], 50)),
                "http_p95_ms": float(np.percentile(mine["http"], 95)),
                "ping_p50_ms": float(np.percentile(mine["ping"], 50)),
                # from each answer's Server-Timing (gata-ft only): per request, p50
                "server_predict_p50_ms": _p50(mine["predict"]),
                "handler_p50_ms": _p50(mine["app"] - mine["predict"]),  # the handler's own code
                # loopback, the client's code, uvicorn, and Starlette's routing and sending
                "transport_p50_ms": _p50(mine["http"] - mine["app"]),
                "client_cpu_p50_ms": float(np.percentile(mine["cpu"], 50)),
                # the same servers through http.client, in the blocks between
                "stdlib_http_p50_ms": float(np.percentile(timed["http.client http"], 50)),
                "stdlib_ping_p50_ms": float(np.percentile(timed["http.client ping"], 50)),
                "stdlib_client_cpu_p50_ms": float(np.percentile(timed["http.client cpu"], 50)),
                "b32_texts_per_s": float(np.median([r["throughput"] for r in runs[key]])),
                "peak_rss_mb": max(r["rss_mb"] for r in runs[key]),
            }

    onnx, torch_ = results[ENGINES["served"]], results[ENGINES["pipeline"]]
    print(f"BANKING77 MiniLM, {args.threads} threads, model folder extracted from "
          f"{args.model.name}; HTTP through a minimal keep-alive client")  # fmt: skip
    print(f"{'(latencies in ms)':<40}{'cold start':>11}{'lib p50':>9}{'lib p95':>9}"
          f"{'http p50':>10}{'http p95':>10}{'b32 /s':>8}{'peak RSS':>10}")  # fmt: skip
    for engine, r in results.items():
        print(f"{engine:<40}{r['cold_start_s']:>10.2f}s{r['b1_p50_ms']:>9.2f}{r['b1_p95_ms']:>9.2f}"
              f"{r['http_p50_ms']:>10.2f}{r['http_p95_ms']:>10.2f}{r['b32_texts_per_s']:>8.0f}"
              f"{r['peak_rss_mb']:>8.0f}MB")  # fmt: skip
    cold = torch_["cold_start_s"] / onnx["cold_start_s"]
    print(f"ratios (pipeline / runtime): cold start {cold:.1f}x, "
          f"library p50 {torch_['b1_p50_ms'] / onnx['b1_p50_ms']:.2f}x, "
          f"HTTP p50 {torch_['http_p50_ms'] / onnx['http_p50_ms']:.2f}x, "
          f"b32 throughput {onnx['b32_texts_per_s'] / torch_['b32_texts_per_s']:.2f}x, "
          f"peak RSS {torch_['peak_rss_mb'] / onnx['peak_rss_mb']:.1f}x")  # fmt: skip
    fp32 = results[ENGINES["fp32"]]
    print(f"ratios (the runtime's fp32 graph / the graph it serves): "
          f"library p50 {fp32['b1_p50_ms'] / onnx['b1_p50_ms']:.2f}x, "
          f"HTTP p50 {fp32['http_p50_ms'] / onnx['http_p50_ms']:.2f}x")  # fmt: skip
    for engine, r in results.items():
        extra = r["http_p50_ms"] - r["b1_p50_ms"]
        print(f"HTTP over the library at p50, {engine}: {extra:+.2f} ms "
              f"(GET /ping, back to back: {r['ping_p50_ms']:.2f} ms)")  # fmt: skip
    for engine, r in results.items():
        if r["server_predict_p50_ms"] is not None:
            print(f"where an HTTP request's time goes, {engine}, p50 (Server-Timing): predict "
                  f"{r['server_predict_p50_ms']:.2f} ms inside the server (library "
                  f"{r['b1_p50_ms']:.2f}), the handler's own code +{r['handler_p50_ms']:.2f}, "
                  f"the rest (loopback, client, uvicorn, routing) +{r['transport_p50_ms']:.2f}; "
                  f"p50 of each part, they need not add up")  # fmt: skip
    stdlib = {engine: r["stdlib_http_p50_ms"] for engine, r in results.items()}
    print(f"through Python's http.client instead (the client of earlier runs), the same servers "
          f"in the blocks between: HTTP p50 {stdlib[ENGINES['served']]:.2f} ms "
          f"({stdlib[ENGINES['served']] - onnx['b1_p50_ms']:+.2f} over the library), pipeline "
          f"{stdlib[ENGINES['pipeline']]:.2f} ms: HTTP ratio "
          f"{stdlib[ENGINES['pipeline']] / stdlib[ENGINES['served']]:.2f}x; GET /ping "
          f"{onnx['stdlib_ping_p50_ms']:.2f} ms back to back (minimal client "
          f"{onnx['ping_p50_ms']:.2f}); the client's CPU a request (its thread, with its "
          f"share of loopback's kernel work): "
          f"http.client {onnx['stdlib_client_cpu_p50_ms']:.3f} ms, minimal client "
          f"{onnx['client_cpu_p50_ms']:.3f} ms")  # fmt: skip
    print(json.dumps(results))
    if args.scope_model.is_file():
        print(scope_overhead(args.scope_model, texts, args.threads))
    else:
        print(f"{args.scope_model} not found: run `make bench-routing` for the scope overhead")


def scope_overhead(artifact: Path, texts: list[str], threads: int) -> str:
    """Batch-1 p50 with and without the out-of-scope score, interleaved on one machine."""
    import shutil

    import onnx

    from gata_ft.archive import safe_extract
    from gata_ft.inference import FEATURES
    from gata_ft.runtime import Model

    with tempfile.TemporaryDirectory() as scratch:
        scored, plain = Path(scratch) / "scored", Path(scratch) / "plain"
        safe_extract(artifact, scored)
        model = Model.load(scored, threads=threads)
        shutil.copytree(scored, plain)
        graph = onnx.load(str(plain / model.graph))
        for output in [o for o in graph.graph.output if o.name == FEATURES]:
            graph.graph.output.remove(output)
        for node in [n for n in graph.graph.node if FEATURES in n.output]:
            graph.graph.node.remove(node)
        onnx.save(graph, str(plain / model.graph))
        baseline = Model.load(plain, threads=threads, verify_files=False)  # graph edited
        if baseline.scope is None or baseline.classifier.has_features:
            sys.exit(f"{artifact}: expected a model with out-of-scope statistics")
        timings = {"without the score": [], "with the score": []}
        for i, text in enumerate(texts[:1020]):
            pair = [("without the score", baseline), ("with the score", model)]
            for name, engine in pair if i % 2 else pair[::-1]:
                started = time.perf_counter()
                engine.predict([text])
                if i >= 20:  # warm-up
                    timings[name].append((time.perf_counter() - started) * 1000)
        p50 = {name: float(np.percentile(t, 50)) for name, t in timings.items()}
        # the paired difference per ticket is steadier than two p50s on a shared machine
        extra = np.array(timings["with the score"]) - np.array(timings["without the score"])
    overhead = float(np.median(extra)) / p50["without the score"]
    return (
        f"out-of-scope score ({artifact.parent.parent.name}), batch 1 through the library, "
        f"1,000 tickets interleaved: p50 {p50['without the score']:.3f} ms without, "
        f"{p50['with the score']:.3f} ms with; median paired difference "
        f"{1000 * float(np.median(extra)):+.0f} us: overhead {100 * overhead:+.1f}%"
    )


def _p50(values: np.ndarray) -> float | None:
    return None if np.isnan(values).all() else float(np.percentile(values, 50))


def http_latencies(engine: str, folder: Path, texts: list[str], threads: int) -> dict:
    """Per request, in ms, on one server: the last tickets warm up, then texts[:300] go
    through each client in alternating blocks of 50 (so that the machine's drift falls on
    both alike), then GET /ping alone, the round trip with no model and no JSON, in blocks
    of its own, so that tickets follow each other as in the library's loop."""
    port = free_port()
    if engine != "pipeline":
        command = [sys.executable, "-m", "gata_ft", "serve", str(folder), "--host", "127.0.0.1",
                   "--port", str(port), "--threads", str(threads),
                   "--graph", "fp32" if engine == "fp32" else "serve"]  # fmt: skip
    else:
        command = [sys.executable, "-c", PIPELINE_SERVER, str(folder), str(port), str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = {}
    try:
        wait_for_ping(port, server)
        # each keeps one connection alive, as SageMaker's front end does to the container
        clients = {name: kind(port) for name, kind in CLIENTS.items()}
        out = {f"{name} {part}": [] for name in clients for part in PARTS}
        bodies = [json.dumps({"text": text}).encode() for text in texts]
        for body in bodies[300:]:  # warm-up: the last ones, as the library's run
            for client in clients.values():
                client.request("POST", "/invocations", body, "application/json")
        measured = [("POST", "/invocations", body) for body in bodies[:300]]
        requests = measured + [("GET", "/ping", b"")] * 300
        for block, first in enumerate(range(0, len(requests), 50)):
            for name in list(clients)[:: 1 if block % 2 else -1]:
                for method, path, body in requests[first : first + 50]:
                    content_type = "application/json" if body else ""
                    cpu, started = time.thread_time(), time.perf_counter()
                    status, headers, _ = clients[name].request(method, path, body, content_type)
                    elapsed = (time.perf_counter() - started) * 1000
                    cpu = (time.thread_time() - cpu) * 1000
                    assert status == 200, f"{engine}: HTTP {status} on {method} {path}"
                    if method == "GET":
                        out[f"{name} ping"].append(elapsed)
                        continue
                    out[f"{name} http"].append(elapsed)
                    out[f"{name} cpu"].append(cpu)
                    timing = dict(  # gata-ft: "app;dur=1.334, predict;dur=1.096"; pipeline none
                        item.strip().split(";dur=") for item in
                        headers.get("server-timing", "").split(",") if ";dur=" in item
                    )  # fmt: skip
                    out[f"{name} app"].append(float(timing.get("app", "nan")))
                    out[f"{name} predict"].append(float(timing.get("predict", "nan")))
        return out
    finally:
        for client in clients.values():
            client.close()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
