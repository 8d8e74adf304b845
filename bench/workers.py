"""What SAGEMAKER_MODEL_SERVER_WORKERS costs: memory and throughput of `gata-ft serve`
with 1 and with 2 worker processes, side by side on the same model.

Each server gets 600 BANKING77 tickets as single requests from 2 concurrent
clients (kept-alive connections, as SageMaker's front end holds them; bench/serving.py's
minimal client, so that little of the 2 cores goes to the clients), then the
memory of its whole process tree is read from /proc: RSS counts the shared
libraries once per process, PSS splits them among the processes that map them
(what the tree really holds), and each process's peak (VmHWM). A serverless
endpoint's memory size caps the tree's total.

Uses the BANKING77 model exported by `make bench-export`. Run: make bench-workers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import describe
from serving import MinimalClient, free_port, wait_for_ping

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "bench" / "banking77"
DATA = REPO.parent / "shared" / "data" / "banking77"
CLIENTS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORK / "export-avx2.tar.gz")
    parser.add_argument("--tickets", type=int, default=600)
    args = parser.parse_args()
    print(describe())
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run `make bench-export` first")
    from gata_ft.archive import safe_extract

    texts = [json.loads(line)["text"] for line in (DATA / "test" / "data.json").open()]
    texts = texts[: args.tickets]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"  # as SageMaker extracts model.tar.gz
        safe_extract(args.model, folder)
        for workers in (1, 2):
            rows.append((workers, *measure(folder, workers, texts)))
    print(f"BANKING77 MiniLM served from {args.model.name}, {os.cpu_count()} cores, "
          f"{len(texts)} single requests from {CLIENTS} clients")  # fmt: skip
    print(f"{'workers':<9}{'processes':>10}{'RSS':>9}{'PSS':>9}{'largest peak':>14}"
          f"{'tickets/s':>11}")  # fmt: skip
    for workers, processes, rss, pss, peak, rate in rows:
        print(f"{workers:<9}{processes:>10}{rss:>7.0f}MB{pss:>7.0f}MB{peak:>12.0f}MB{rate:>11.0f}")
    (_, _, _, pss1, _, rate1), (_, _, _, pss2, _, rate2) = rows
    print(f"2 workers / 1: memory (PSS) {pss2 / pss1:.2f}x, throughput {rate2 / rate1:.2f}x; "
          f"at rest after single requests a 2 GB endpoint holds 2 workers with "
          f"{2048 - pss2:.0f} MB to spare (batches take more)")  # fmt: skip


def measure(folder: Path, workers: int, texts: list[str]):
    """(processes, RSS MB, PSS MB, largest per-process peak MB, tickets/s) of one server."""
    port = free_port()
    env = {**os.environ, "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers)}
    command = [sys.executable, "-m", "gata_ft", "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_ping(port, server)

        def client(part: list[str]) -> None:
            connection = MinimalClient(port, timeout=60)  # little client work on the 2 cores
            for text in part:
                body = json.dumps({"text": text}).encode()
                status, _, _ = connection.request("POST", "/invocations", body, "application/json")
                assert status == 200, status
            connection.close()

        parts = [texts[i::CLIENTS] for i in range(CLIENTS)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, [p[:20] for p in parts]))  # warm-up: every worker has run
            started = time.perf_counter()
            list(pool.map(client, parts))
            rate = len(texts) / (time.perf_counter() - started)
        tree = [server.pid, *descendants(server.pid)]
        memory = [status(pid) for pid in tree]
        for pid, m in zip(tree, memory, strict=True):
            role = "gata-ft serve" if pid == server.pid else role_of(pid)
            print(f"  {workers} worker(s): pid {pid} {role}: PSS {m['Pss'] / 1024:.0f} MB, "
                  f"peak {m['VmHWM'] / 1024:.0f} MB")  # fmt: skip
        rss = sum(m["Rss"] for m in memory) / 1024
        pss = sum(m["Pss"] for m in memory) / 1024
        return len(tree), rss, pss, max(m["VmHWM"] for m in memory) / 1024, rate
    finally:
        server.terminate()
        server.wait()


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def role_of(pid: int) -> str:
    """What a process of the server's tree is, from its command line."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "resource_tracker" in command:
        return "multiprocessing's resource tracker"
    return "worker" if "spawn_main" in command else command[:60]


def status(pid: int) -> dict[str, int]:
    """Rss and Pss (smaps_rollup) and VmHWM (status) of a process, in kB."""
    values = {}
    for name in ("smaps_rollup", "status"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


if __name__ == "__main__":
    main()
