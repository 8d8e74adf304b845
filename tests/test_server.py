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
from conftest import FIXED

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


def post(url: str, body: bytes, content_type="application/json"):
    request = urllib.request.Request(url + "/invocations", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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
