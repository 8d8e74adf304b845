"""`gata-ft serve`: the SageMaker inference contract over real HTTP on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import FIXED, REPO

from gata_ft.archive import safe_extract
from gata_ft.runtime import Model


@pytest.fixture(scope="module")
def model(trained_artifact):
    return Model.load(trained_artifact["tarball"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_artifact, tmp_path_factory):
    """`gata-ft serve` in its own process on loopback, as in the container."""
    folder = tmp_path_factory.mktemp("served")
    safe_extract(trained_artifact["tarball"], folder)
    port = _free_port()
    env = {**os.environ, "SM_MODEL_DIR": str(folder)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gata_ft", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/ping", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("server did not start: " + process.stdout.read())
    yield url
    process.terminate()
    process.wait(timeout=10)


def exchange(url: str, body: bytes, content_type="application/json"):
    """(status, body, headers) of a POST /invocations."""
    request = urllib.request.Request(url + "/invocations", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def post(url: str, body: bytes, content_type="application/json"):
    status, answer, _ = exchange(url, body, content_type)
    return status, json.loads(answer)


def test_server_round_trip(server, model):
    assert urllib.request.urlopen(server + "/ping", timeout=5).status == 200
    status, body = post(server, json.dumps({"text": FIXED[0]}).encode())
    assert status == 200
    expected = model.predict([FIXED[0]])[0]
    assert body == {"prediction": expected.to_dict()}
    assert set(body["prediction"]) == {"label", "probability", "route", "queue", "out_of_scope"}
    status, body = post(server, json.dumps({"texts": FIXED[:3], "top_k": 2}).encode())
    assert status == 200
    assert len(body["predictions"]) == 3
    assert len(body["predictions"][0]["top_k"]) == 2


def _timings(header: str) -> dict[str, float]:
    """{"app": ms, "predict": ms} from a Server-Timing header (W3C: name;dur=ms, ...)."""
    parts = (item.strip().split(";dur=") for item in header.split(","))
    return {name: float(value) for name, value in parts}


def test_an_answer_says_where_its_time_went(server):
    status, _, headers = exchange(server, json.dumps({"text": FIXED[0]}).encode())
    assert status == 200
    timings = _timings(headers["Server-Timing"])
    assert set(timings) == {"app", "predict"}
    assert 0 < timings["predict"] <= timings["app"]


def test_the_benchmarks_minimal_client_reads_what_http_client_reads(server, monkeypatch):
    """bench-runtime times the server through bench/serving.py's minimal client: request
    after request on one connection, it must read the status, headers and body that
    Python's http.client reads, errors included."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from serving import MinimalClient, StdlibClient

    port = int(server.rsplit(":", 1)[1])
    clients = MinimalClient(port), StdlibClient(port)
    requests = [
        ("POST", "/invocations", b'{"text": "my card was declined"}', "application/json", 200),
        ("GET", "/ping", b"", "", 200),
        ("POST", "/invocations", b'{"texts": ["a", "b b"], "top_k": 2}', "application/json", 200),
        ("POST", "/invocations", "\"caf\u00e9\"\n\"t\u00e9\"\n".encode(), "application/jsonlines",
         200),
        ("POST", "/invocations", b"a,b\n", "text/plain", 415),
        ("POST", "/invocations", b'{"text": ', "application/json", 400),
        ("GET", "/execution-parameters", b"", "", 200),
    ]  # fmt: skip
    try:
        for method, path, body, kind, status in requests * 2:
            minimal, stdlib = (c.request(method, path, body, kind) for c in clients)
            assert minimal[0] == stdlib[0] == status, (path, body)
            assert minimal[2] == stdlib[2]
            assert minimal[2] or path == "/ping"  # /ping's answer alone is empty
            varying = ("date", "server-timing")  # the clock's
            assert {k: v for k, v in minimal[1].items() if k not in varying} == {
                k: v for k, v in stdlib[1].items() if k not in varying
            }
            timed = "server-timing" in minimal[1]
            assert timed == (path == "/invocations" and status == 200)
    finally:
        for client in clients:
            client.close()


def test_server_timing_measures_the_model_apart_from_the_app():
    """A model that takes 30 ms and a body that takes 20 ms to arrive: predict says at
    least 30, app at least 20 more."""
    import asyncio

    from gata_ft.runtime import Prediction
    from gata_ft.server import create_app

    class SlowModel:
        def predict(self, texts, top_k=0):
            time.sleep(0.03)
            return [Prediction(7, 0.9) for _ in texts]

    sent = []

    async def receive():
        await asyncio.sleep(0.02)  # a slow client: inside the handler, outside predict
        return {"type": "http.request", "body": b'{"text": "card lost"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "root_path": "",
             "scheme": "http", "server": ("test", 80), "http_version": "1.1"}  # fmt: skip
    asyncio.run(create_app(SlowModel())(scope, receive, send))
    start, body = sent
    assert start["status"] == 200, body
    assert json.loads(body["body"]) == {"prediction": {"label": "7", "probability": 0.9}}
    timings = _timings(dict(start["headers"])[b"server-timing"].decode())
    assert 30 <= timings["predict"] < 1000
    assert timings["app"] - timings["predict"] >= 20


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "expected a JSON object with a 'text' field, found invalid JSON: "),
        (b"[1, 2]", "expected a JSON object with a 'text' field, found list"),
        (b'{"txt": "hello"}', "expected a 'text' field (or 'texts'), found fields: 'txt'"),
        (b'{"text": 42}', "text: expected a string, found int"),
        (b'{"text": "   "}', "text: expected some words, found an empty text"),
        (b'{"texts": []}', "'texts': expected a list of 1 to 256 strings"),
        (b'{"text": "hi", "top_k": -1}', "top_k: expected an integer from 0 to 10000, found -1"),
    ],
)
def test_server_rejects_bad_payloads_with_400(server, body, message):
    status, answer = post(server, body)
    assert status == 400
    assert answer["error"].startswith(message)


def test_server_under_bounded_concurrent_load(server):
    """20 clients x 50 requests on loopback: every answer is a 200 with a prediction."""

    def client(i):
        results = []
        for j in range(50):
            status, body = post(server, json.dumps({"text": FIXED[(i + j) % len(FIXED)]}).encode())
            results.append(status == 200 and "label" in body["prediction"])
        return results

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = [ok for result in pool.map(client, range(20)) for ok in result]
    assert len(outcomes) == 1000
    assert all(outcomes)


def test_serve_refuses_a_missing_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gata_ft", "serve", str(tmp_path / "none"), "--port", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "no such model" in result.stderr
    assert Path(tmp_path).exists()


def request(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request; any HTTP status is an answer."""
    method = "POST" if body is not None else "GET"
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


JSONL = {"Content-Type": "application/jsonlines"}


def test_json_lines_in_and_out(server, model):
    lines = [
        json.dumps({"text": FIXED[0]}),
        json.dumps(FIXED[1]),
        "",
        json.dumps({"text": FIXED[2]}),
    ]
    status, headers, body = request(server, "/invocations", "\n".join(lines).encode(), JSONL)
    assert status == 200
    assert headers["content-type"].startswith("application/jsonlines")
    answers = [json.loads(line) for line in body.decode().splitlines()]
    assert answers == [p.to_dict() for p in model.predict([FIXED[0], FIXED[1], FIXED[2]])]


def test_csv_in_and_out_with_rfc_4180_quoting(server, model):
    rows = f'"{FIXED[0]}, with a comma"\n{FIXED[1]}\n"a ""quoted"" {FIXED[2]}"\n'
    status, headers, body = request(server, "/invocations", rows.encode(),
                                    {"Content-Type": "text/csv"})  # fmt: skip
    assert status == 200
    assert headers["content-type"].startswith("text/csv")
    import csv
    import io

    answers = list(csv.reader(io.StringIO(body.decode())))
    expected = model.predict([f"{FIXED[0]}, with a comma", FIXED[1], f'a "quoted" {FIXED[2]}'])
    assert [row[0] for row in answers] == [str(p.label) for p in expected]
    assert [float(row[1]) for row in answers] == [round(p.probability, 6) for p in expected]
    assert len(answers[0]) == 5  # label, probability, route, queue, out_of_scope


def test_accept_picks_the_answer_type(server):
    body = json.dumps({"texts": FIXED[:2]}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/jsonlines"}
    status, answer_headers, answer = request(server, "/invocations", body, headers)
    assert status == 200
    assert answer_headers["content-type"].startswith("application/jsonlines")
    assert len(answer.decode().splitlines()) == 2
    headers["Accept"] = "text/csv"
    assert request(server, "/invocations", body, headers)[2].decode().count("\n") == 2
    headers["Accept"] = "image/png"
    status, _, answer = request(server, "/invocations", body, headers)
    assert status == 406
    assert json.loads(answer)["error"].startswith("Accept: expected application/json")


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"hello", {"Content-Type": "text/plain"}, 415,
         "Content-Type: expected application/json, application/jsonlines or text/csv, found "
         "'text/plain'"),
        (b"[" * 100_000 + b"]" * 100_000, {}, 400, "found JSON nested too deeply"),
        (b'{"text": "hi", "top_k": ' + b"9" * 5000 + b"}", {}, 400, "invalid JSON: "),
        (b'{"text": "hi", "top_k": 100000}', {}, 400,
         "top_k: expected an integer from 0 to 10000, found 100000"),
        (b"\xff\xfe{", {}, 400, "expected UTF-8, found byte 0xff at 0"),
        (b'{"text": "ok"}\n[1]\n', JSONL, 400,
         'line 2: expected {"text": ...} or a string, found list'),
        (b'{"text": "ok"}\n{bad\n', JSONL, 400, "line 2: expected "),
        (b'"ok"\n"   "\n', JSONL, 400, "record 2: expected some words, found an empty text"),
        (b"\n\n", JSONL, 400, "expected at least one line with a text, found none"),
        (b'"unclosed\n', {"Content-Type": "text/csv"}, 400, "expected CSV (RFC 4180)"),
        # a row without a text is named, not dropped: answers must line up with the rows
        (b"a b\n,second column\nc d\n", {"Content-Type": "text/csv"}, 400,
         "record 2: expected some words, found an empty text"),
    ],
)  # fmt: skip
def test_every_malformed_body_is_a_4xx_never_a_500(server, body, headers, status, message):
    got, _, answer = request(server, "/invocations", body, {"Content-Type": "application/json",
                                                            **headers})  # fmt: skip
    assert got == status
    assert message in json.loads(answer)["error"]


def test_execution_parameters_for_batch_transform(server):
    status, _, body = request(server, "/execution-parameters")
    assert status == 200
    assert json.loads(body) == {
        "MaxConcurrentTransforms": 1,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 6,
    }


def start_server(folder: Path, env: dict | None = None, args=()):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gata_ft", "serve", str(folder), "--host", "127.0.0.1",
         "--port", str(port), *args],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if urllib.request.urlopen(url + "/ping", timeout=1).status == 200:
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("server did not start: " + process.stdout.read())


def test_the_body_limit_follows_sagemaker_max_payload(trained_artifact):
    process, url = start_server(trained_artifact["tarball"], {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"})
    try:
        import http.client

        # a 1.4 MB body announced: the server answers 413 before reading it
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(1_400_000))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == (
            "expected a body of at most 1 MB (SAGEMAKER_MAX_PAYLOAD_IN_MB), found 1.3 MB"
        )
        connection.close()
        # no Content-Length (chunked): counted as it arrives, refused past the limit
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        chunks = (b"x" * 2**16 for _ in range(40))  # 2.5 MB
        connection.request("POST", "/invocations", body=chunks, encode_chunked=True,
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == (
            "expected a body of at most 1 MB (SAGEMAKER_MAX_PAYLOAD_IN_MB), found more (stopped "
            "reading there)"
        )
        connection.close()
        assert json.loads(request(url, "/execution-parameters")[2])["MaxPayloadInMB"] == 1
        status, _, _ = request(url, "/invocations", json.dumps({"text": FIXED[0]}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
        assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_sigterm_and_sigint_remove_the_extraction_folder(trained_artifact, tmp_path):
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        scratch = tmp_path / f"tmp-{sig.name}"
        scratch.mkdir()
        process, _ = start_server(trained_artifact["tarball"], {"TMPDIR": str(scratch)})
        assert len(list(scratch.glob("gata-ft-model-*"))) == 1  # the extracted tarball
        process.send_signal(sig)
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0, out
        assert list(scratch.glob("gata-ft-*")) == []
        assert "Traceback" not in out


def test_a_port_in_use_is_one_error_line(trained_artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gata_ft", "serve", str(trained_artifact["tarball"]),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: port {port} on 127.0.0.1: expected a free port, found")
    assert "Traceback" not in result.stderr


def test_a_model_folder_holding_a_tarball_is_loaded_with_a_notice(trained_artifact, tmp_path):
    import shutil

    folder = tmp_path / "opt-ml-model"
    folder.mkdir()
    shutil.copy2(
        trained_artifact["tarball"], folder / "model.tar.gz"
    )  # a model folder tarred again
    process, url = start_server(folder)
    try:
        status, _, _ = request(url, "/invocations", json.dumps({"text": FIXED[0]}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
        assert status == 200
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=20)
    assert "holds model.tar.gz rather than its files: loading that" in out


def test_two_workers_serve_as_separate_processes(trained_artifact):
    process, url = start_server(
        trained_artifact["tarball"], {"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    )
    try:
        assert json.loads(request(url, "/execution-parameters")[2])["MaxConcurrentTransforms"] == 2
        # two worker processes under the supervisor, each with its own model
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [pid for pid in children
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]  # fmt: skip
        assert len(workers) == 2, children
        for text in FIXED:
            status, _, _ = request(url, "/invocations", json.dumps({"text": text}).encode(),
                                   {"Content-Type": "application/json"})  # fmt: skip
            assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "nan", "positive number up to 1,000,000, found 'nan'"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "inf", "positive number up to 1,000,000, found 'inf'"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "1e308", "positive number up to 1,000,000, found '1e308'"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "1e-9", "positive number up to 1,000,000, found '1e-9'"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "-5", "positive number up to 1,000,000, found '-5'"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "2.5", "positive whole number up to 64, found '2.5'"),
        ("SAGEMAKER_BIND_TO_PORT", "\u00b2", "port (1-65535), found '\u00b2'"),
        ("SAGEMAKER_BIND_TO_PORT", "http", "port (1-65535), found 'http'"),
        ("SAGEMAKER_BIND_TO_PORT", "70000", "port (1-65535), found '70000'"),
    ],
)
def test_bad_sagemaker_variables_are_one_error_line(trained_artifact, name, value, expected):
    from click.testing import CliRunner

    from gata_ft.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(trained_artifact["tarball"])], env={name: value})
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {name}: expected a {expected}"]


def test_workers_get_the_thread_count_and_skip_a_second_file_check(monkeypatch, tmp_path):
    import uvicorn

    from gata_ft import server

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    for name in ("GATA_SERVE_MODEL", "GATA_SERVE_GRAPH", "GATA_SERVE_THREADS"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test, whatever it writes
    settings = server.Settings(workers=2)
    server.serve_workers(str(tmp_path), "int8", "127.0.0.1", 8080, settings, threads=3)
    assert seen["workers"] == 2
    assert seen["factory"] is True
    assert os.environ["GATA_SERVE_THREADS"] == "3"  # --threads reaches every worker
    server.serve_workers(str(tmp_path), "int8", "127.0.0.1", 8080, settings)
    assert os.environ["GATA_SERVE_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

    loaded = {}
    monkeypatch.setattr(server.Model, "load", lambda path, **kw: loaded.update(path=path, **kw))
    monkeypatch.setattr(server, "create_app", lambda model, settings: "app")
    assert server.worker_app() == "app"
    assert loaded == {"path": str(tmp_path), "graph": "int8",
                      "threads": int(os.environ["GATA_SERVE_THREADS"]),
                      "verify_files": False, "shared_threads": True}  # fmt: skip


def test_with_workers_the_parent_frees_its_session_and_passes_threads(trained_artifact,
                                                                       monkeypatch):  # fmt: skip
    from click.testing import CliRunner

    from gata_ft import server
    from gata_ft.cli import cli

    seen, released = {}, []

    def fake_workers(model_path, graph, host, port, settings, threads=0, escalate=None):
        seen.update(path=model_path, threads=threads, workers=settings.workers)

    real = server.Model.release_session

    def release(model):
        released.append(model)
        real(model)

    monkeypatch.setattr(server, "serve_workers", fake_workers)
    monkeypatch.setattr(server.Model, "release_session", release)
    result = CliRunner().invoke(
        cli, ["serve", str(trained_artifact["tarball"]), "--threads", "1", "--port",
              str(_free_port())],
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["workers"] == 2
    assert seen["threads"] == 1  # --threads reaches the workers
    assert len(released) == 1
    assert released[0].classifier is None  # the parent's session is gone before they start


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_server_shares_one_onnxruntime_pool(trained_artifact, monkeypatch, workers):
    from click.testing import CliRunner

    from gata_ft import server
    from gata_ft.cli import cli

    loads = []

    def load(path, **kw):
        loads.append(kw)
        raise KeyboardInterrupt  # stop before serving

    monkeypatch.setattr(server.Model, "load", load)
    CliRunner().invoke(
        cli, ["serve", str(trained_artifact["tarball"]), "--port", str(_free_port())],
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": workers},
    )  # fmt: skip
    # one worker: this process serves and owns its sessions; with more, each worker
    # process does (worker_app) and this one only checks the model, then frees it
    assert loads[0]["shared_threads"] is (workers == "1")
