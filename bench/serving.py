"""A `gata-ft serve` (or any HTTP server) started by a benchmark: a free port, ready, and the
clients that time it."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(port: int, server: subprocess.Popen, seconds: float = 60) -> None:
    """Return once GET /ping answers; exit the benchmark if the server died or never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            return
        except OSError:
            if server.poll() is not None:
                message = f"the server on port {port} exited ({server.returncode})"
                raise SystemExit(message) from None
            time.sleep(0.1)
    raise SystemExit(f"the server on port {port} did not answer /ping in {seconds:g} s")


class MinimalClient:
    """HTTP/1.1 on one kept-alive loopback socket, with as little client code as a request needs.

    What a benchmark of the server should put around it: Python's http.client costs
    0.11 to 0.13 ms more CPU a request than this (it builds the request line by line and
    parses the answer's headers with the email package), which a front end that is not a
    Python program, such as SageMaker's, need not pay. Reads answers with a Content-Length
    only; does not reconnect (a closed connection is a ConnectionError).
    """

    def __init__(self, port: int, timeout: float = 30):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one request, sent in one write."""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        self.socket.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = (line.split(":", 1) for line in lines if ":" in line)
        headers = {name.strip().lower(): value.strip() for name, value in fields}
        if "content-length" not in headers:  # chunked, or a 204: not what a benchmark reads
            raise ValueError(f"{method} {path}: an answer without Content-Length ({status_line})")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._receive()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split(" ", 2)[1]), headers, answer

    def _receive(self) -> None:
        data = self.socket.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.socket.close()


class StdlibClient:
    """Python's http.client behind MinimalClient's interface: the client of earlier runs."""

    def __init__(self, port: int, timeout: float = 30):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": content_type} if content_type else {}
        self.connection.request(method, path, body or None, headers)
        response = self.connection.getresponse()
        answer = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer

    def close(self) -> None:
        self.connection.close()
