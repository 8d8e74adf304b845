"""SageMaker's inference contract over HTTP (Starlette + uvicorn), on the ONNX runtime.

GET  /ping                  200 once the model is loaded
GET  /execution-parameters  batch transform's settings
POST /invocations           application/json      {"text": "..."} -> {"prediction": {...}},
                                                  {"texts": [...]} -> {"predictions": [...]}
                            application/jsonlines one ticket a line ({"text": ...} or "...")
                            text/csv              one ticket a row, in its first column
                            the Accept header picks the answer's type (default: the request's)
                            a 200 carries Server-Timing: app;dur=MS, predict;dur=MS (the
                            request in this handler, and the model's part of it)
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gata_ft.errors import ConfigError
from gata_ft.runtime import InputError, Model, Prediction

MAX_BATCH = 256  # texts in one application/json request
MAX_RECORDS = 100_000  # lines or rows in one jsonlines or csv request (batch transform)
INLINE_TEXTS = 8  # at most this many texts run on the event loop: no thread-pool hop
JSON, JSONLINES, CSV = "application/json", "application/jsonlines", "text/csv"
CONTENT_TYPES = {
    JSON: JSON,
    JSONLINES: JSONLINES,
    "application/x-jsonlines": JSONLINES,
    "application/jsonl": JSONLINES,
    CSV: CSV,
}
CSV_COLUMNS = ("label", "probability", "route", "queue", "out_of_scope")


@dataclass(frozen=True)
class Settings:
    """The server's limits, from SageMaker's environment variables."""

    max_payload_bytes: int = 6 * 2**20  # SageMaker's real-time maximum
    timeout_seconds: float = 60.0
    workers: int = 1

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env

        def number(name: str, default: float, kind=int, scale: int = 1, cap: float = 1e6):
            raw = env.get(name, "")
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:  # and int()'s digit limit
                value = 0
            if not 0 < value <= cap or kind(value * scale) < 1:  # nan, inf, 1e308, 1e-9 MB
                whole = " whole" if kind is int else ""
                expected = f"a positive{whole} number up to {cap:,.0f}"
                raise ConfigError(f"{name}: expected {expected}, found {raw[:100]!r}")
            return kind(value * scale)

        return cls(
            max_payload_bytes=int(number("SAGEMAKER_MAX_PAYLOAD_IN_MB", 6 * 2**20, float, 2**20)),
            timeout_seconds=number("SAGEMAKER_MODEL_SERVER_TIMEOUT", 60.0, float),
            workers=number("SAGEMAKER_MODEL_SERVER_WORKERS", 1, cap=64),
        )


def port_from_env(env=None) -> int:
    """SAGEMAKER_BIND_TO_PORT, or 8080."""
    env = os.environ if env is None else env
    raw = env.get("SAGEMAKER_BIND_TO_PORT", "").strip()
    if not raw:
        return 8080
    if not (raw.isascii() and raw.isdigit() and len(raw) < 6 and 0 < int(raw) < 65536):
        raise ConfigError(f"SAGEMAKER_BIND_TO_PORT: expected a port (1-65535), found {raw[:100]!r}")
    return int(raw)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(model: Model, settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()

    async def ping(request: Request) -> Response:
        return Response(status_code=200)

    async def execution_parameters(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "MaxConcurrentTransforms": settings.workers,
                "BatchStrategy": "MULTI_RECORD",
                "MaxPayloadInMB": settings.max_payload_bytes // 2**20,
            }
        )

    async def invocations(request: Request) -> Response:
        started = time.perf_counter()
        try:
            kind = _content_type(request)
            answer = _accept(request, kind)
            body = await _body(request, settings.max_payload_bytes)
            texts, top_k, single = _parse(body, kind)
            predicting = time.perf_counter()
            if len(texts) <= INLINE_TEXTS:
                predictions = model.predict(texts, top_k)
            else:  # onnxruntime releases the GIL: /ping answers meanwhile
                predictions = await asyncio.wait_for(
                    run_in_threadpool(model.predict, texts, top_k), settings.timeout_seconds
                )
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except InputError as e:
            message = str(e)
            if kind == JSON and single:
                message = message.replace("texts[0]", "text")
            elif kind != JSON:
                message = _record_names(message)
            return JSONResponse({"error": message}, status_code=400)
        except TimeoutError:
            return JSONResponse(
                {"error": f"prediction took over {settings.timeout_seconds:g} s "
                          "(SAGEMAKER_MODEL_SERVER_TIMEOUT)"},
                status_code=504,
            )  # fmt: skip
        predicted = time.perf_counter()
        response = _answer(predictions, answer, single)
        # where a request's time goes: the handler's part against the rest (W3C
        # Server-Timing, milliseconds); its cost is four clock reads and this line
        app_ms, predict_ms = (time.perf_counter() - started) * 1e3, (predicted - predicting) * 1e3
        response.headers["server-timing"] = f"app;dur={app_ms:.3f}, predict;dur={predict_ms:.3f}"
        return response

    return Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/execution-parameters", execution_parameters, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
        ]
    )


def _content_type(request: Request) -> str:
    raw = request.headers.get("content-type", JSON)
    kind = CONTENT_TYPES.get(raw.split(";")[0].strip().lower())
    if kind is None:
        raise BadRequest(
            415, f"Content-Type: expected {JSON}, {JSONLINES} or {CSV}, found {raw[:100]!r}"
        )
    return kind


def _accept(request: Request, kind: str) -> str:
    raw = request.headers.get("accept", "")
    for part in raw.split(","):
        wanted = part.split(";")[0].strip().lower()
        if wanted in CONTENT_TYPES:
            return CONTENT_TYPES[wanted]
    if not raw.strip() or any(p.split(";")[0].strip() in ("*/*", "") for p in raw.split(",")):
        return kind
    raise BadRequest(406, f"Accept: expected {JSON}, {JSONLINES} or {CSV}, found {raw[:100]!r}")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, _too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, _too_large(None, limit))  # the rest is not read
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> str:
    found = f"{size / 2**20:.1f} MB" if size is not None else "more (stopped reading there)"
    limit_mb = f"{limit / 2**20:g} MB"
    return f"expected a body of at most {limit_mb} (SAGEMAKER_MAX_PAYLOAD_IN_MB), found {found}"


def _parse(body: bytes, kind: str) -> tuple[list, int, bool]:
    """(texts, top_k, single) from a request body; BadRequest (400) for anything malformed."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadRequest(
            400, f"expected UTF-8, found byte 0x{body[e.start]:02x} at {e.start}"
        ) from None
    if kind == CSV:
        try:
            # only blank lines are skipped: a row with an empty first column is a record
            # (a 400 naming it), or answers would no longer line up with the rows
            rows = [r for r in csv.reader(io.StringIO(text, newline=""), strict=True) if r]
        except csv.Error as e:
            raise BadRequest(400, f"expected CSV (RFC 4180), found {e}") from e
        return _records([r[0] for r in rows], "row"), 0, False
    if kind == JSONLINES:
        texts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                texts.append(_line_text(_json(line, f"line {number}: "), number))
        return _records(texts, "line"), 0, False
    payload = _json(text, "")
    if not isinstance(payload, dict):
        kind_found = type(payload).__name__
        raise BadRequest(400, f"expected a JSON object with a 'text' field, found {kind_found}")
    top_k = payload.get("top_k", 0)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= 10_000:
        shown = json.dumps(top_k)[:40] if not isinstance(top_k, int) else str(top_k)[:40]
        raise BadRequest(400, f"top_k: expected an integer from 0 to 10000, found {shown}")
    if "text" in payload:
        return [payload["text"]], top_k, True
    if "texts" in payload:
        texts = payload["texts"]
        if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_BATCH:
            raise BadRequest(400, f"'texts': expected a list of 1 to {MAX_BATCH} strings")
        return texts, top_k, False
    keys = ", ".join(repr(k)[:40] for k in list(payload)[:10]) or "none"
    raise BadRequest(400, f"expected a 'text' field (or 'texts'), found fields: {keys}")


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        found = f"invalid JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        found = "JSON nested too deeply"
    except ValueError as e:  # an integer of more than 4,300 digits
        found = f"invalid JSON: {str(e)[:80]}"
    first = "a JSON object with a 'text' field" if not where else '{"text": ...} or a string'
    raise BadRequest(400, f"{where}expected {first}, found {found}")


def _line_text(record, number: int):
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and "text" in record:
        return record["text"]
    found = type(record).__name__ if not isinstance(record, dict) else "an object without 'text'"
    raise BadRequest(400, f'line {number}: expected {{"text": ...}} or a string, found {found}')


def _records(texts: list, unit: str) -> list:
    if not texts:
        raise BadRequest(400, f"expected at least one {unit} with a text, found none")
    if len(texts) > MAX_RECORDS:
        raise BadRequest(400, f"expected at most {MAX_RECORDS:,} {unit}s, found {len(texts):,}")
    return texts


def _record_names(message: str) -> str:
    """texts[4] -> record 5 (a line or a row, counted from 1)."""
    import re

    return re.sub(r"texts\[(\d+)\]", lambda m: f"record {int(m.group(1)) + 1}", message)


def _answer(predictions: list[Prediction], kind: str, single: bool) -> Response:
    rows = [p.to_dict() for p in predictions]
    if kind == JSON:
        body = {"prediction": rows[0]} if single else {"predictions": rows}
        return Response(json.dumps(body, separators=(",", ":")), media_type=JSON)
    if kind == JSONLINES:
        text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        return Response(text, media_type=JSONLINES)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])
    return Response(out.getvalue(), media_type=CSV)


def check_port(host: str, port: int) -> None:
    """Fail with a clear error when the port is taken, before loading anything else."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"port {port} on {host}: expected a free port, found {e.strerror or e}; stop "
                "what listens there or pass --port (SAGEMAKER_BIND_TO_PORT)"
            ) from None


def serve(model: Model, host: str, port: int, settings: Settings | None = None) -> None:
    """Run the server in this process (one worker)."""
    import uvicorn

    settings = settings or Settings.from_env()
    uvicorn.run(
        create_app(model, settings), host=host, port=port, log_level="info", access_log=False
    )


def serve_workers(
    model_path: str,
    graph: str,
    host: str,
    port: int,
    settings: Settings,
    threads: int = 0,
    escalate: bool | None = None,
) -> None:
    """Run `settings.workers` processes, each loading the model (SAGEMAKER_MODEL_SERVER_WORKERS).

    The parent has verified the files and replayed the golden samples already,
    so the workers skip the sha256 check of the same folder. `threads` 0 shares
    the cores among the workers; `escalate` False serves int8 alone in each.
    """
    import uvicorn

    threads = threads or max(1, (os.cpu_count() or 1) // settings.workers)
    os.environ.update(
        {"GATA_SERVE_MODEL": model_path, "GATA_SERVE_GRAPH": graph,
         "GATA_SERVE_THREADS": str(threads)}
    )  # fmt: skip
    if escalate is False:
        os.environ["GATA_ESCALATE"] = "0"  # what Model.load reads in each worker
    uvicorn.run(
        "gata_ft.server:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=settings.workers,
        log_level="info",
        access_log=False,
    )


def worker_app() -> Starlette:
    """One worker process's app: the model named by serve_workers."""
    model = Model.load(
        os.environ["GATA_SERVE_MODEL"],
        graph=os.environ.get("GATA_SERVE_GRAPH", "serve"),
        threads=int(os.environ.get("GATA_SERVE_THREADS", "0")),
        verify_files=False,  # the parent checked this folder before starting the workers
        shared_threads=True,  # a worker process owns its sessions: one onnxruntime pool
    )
    return create_app(model, Settings.from_env())
