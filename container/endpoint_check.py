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
print(f"== {image}: cold start (container start to the first 200 on /ping) {time.time() - started:.1f} s")


def post(body: bytes, content_type: str, accept: str = "") -> tuple[str, bytes]:
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url + "/invocations", body, headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["Content-Type"], response.read()


kind, body = post(json.dumps({"text": "where is my parcel"}).encode(), "application/json")
assert kind.startswith("application/json") and json.loads(body)["prediction"]["label"].isdigit()
kind, body = post(b'{"text": "refund please"}\n"my card was declined"\n', "application/jsonlines")
assert kind.startswith("application/jsonlines") and len(body.decode().splitlines()) == 2
kind, body = post(b'"where, oh where is my parcel"\nrefund please\n', "text/csv")
assert kind.startswith("text/csv") and len(body.decode().splitlines()) == 2
kind, body = post(b"where is my parcel\n", "text/csv", accept="application/json")
assert json.loads(body)["predictions"][0]["label"].isdigit()
parameters = json.loads(urllib.request.urlopen(url + "/execution-parameters", timeout=5).read())
assert parameters["BatchStrategy"] == "MULTI_RECORD"
print(f"== {image}: /invocations answered application/json, application/jsonlines and text/csv")
