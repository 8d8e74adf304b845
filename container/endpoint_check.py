"""Call a serving container as SageMaker does: /ping until 200, then /invocations in each type.

Usage: endpoint_check.py URL START_EPOCH IMAGE   (prints the cold start: start to first 200)
"""

import json
import sys
import time
import urllib.error
import urllib.request

url, started, image = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.time() + 120
while True:
    try:
        if urllib.request.urlopen(url + "/ping", timeout=2).status == 200:
            break
    except (OSError, urllib.error.URLError):
        if time.time() > deadline:
            sys.exit(f"{image}: /ping did not answer 200 within 120 s")
        time.sleep(0.1)
cold = time.time() - started
print(f"== {image}: cold start (container start to the first 200 on /ping) {cold:.1f} s")


def post(body: bytes, content_type: str, accept: str = "") -> tuple[str, bytes]:
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url + "/invocations", body, headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["Content-Type"], response.read()


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"{image}: {what}")


kind, body = post(json.dumps({"text": "where is my parcel"}).encode(), "application/json")
check(kind.startswith("application/json"), f"application/json answered as {kind}")
check(json.loads(body)["prediction"]["label"].isdigit(), f"no label in {body[:200]!r}")
kind, body = post(b'{"text": "refund please"}\n"my card was declined"\n', "application/jsonlines")
check(kind.startswith("application/jsonlines"), f"application/jsonlines answered as {kind}")
check(len(body.decode().splitlines()) == 2, f"expected 2 lines, found {body[:200]!r}")
kind, body = post(b'"where, oh where is my parcel"\nrefund please\n', "text/csv")
check(kind.startswith("text/csv"), f"text/csv answered as {kind}")
check(len(body.decode().splitlines()) == 2, f"expected 2 rows, found {body[:200]!r}")
kind, body = post(b"where is my parcel\n", "text/csv", accept="application/json")
check(json.loads(body)["predictions"][0]["label"].isdigit(), "Accept: application/json ignored")
parameters = json.loads(urllib.request.urlopen(url + "/execution-parameters", timeout=5).read())
check(parameters["BatchStrategy"] == "MULTI_RECORD", f"execution-parameters: {parameters}")
print(f"== {image}: /invocations answered application/json, application/jsonlines and text/csv")
