"""A small HTTP proxy on a loopback port in front of moto's server that breaks a share of the requests on purpose.

Every request is forwarded to the upstream server, except that a seeded plan picks, for `rate` of them, one fault:

- "reset":       the connection is reset before the request is forwarded (nothing happened upstream);
- "reset_after": the request is forwarded, then the connection is reset instead of answering (it took effect,
                 but the caller cannot know);
- "500", "503":  an error answer with an S3-style XML body (JSON for SQS), the request not forwarded;
- "cut":         the answer's headers promise more body than is sent, then the connection is closed (forwarded:
                 it took effect). Answers without a body (HEAD, 204, an empty 200) are reset instead
                 ("reset_after"): there is nothing to cut.

`plan(faults)` queues faults for the next requests, one each, before the random plan goes on (for tests that
need one fault at one place). `outage(seconds)` resets every request (on new connections and kept-alive ones)
for that long. `counts` says how many requests came and how many faults of each kind were made ("outage": requests
reset by the outage), so a test can check that they happened.
"""

import http.client
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("reset", "reset_after", "500", "503", "cut")
# not passed on: hop-by-hop headers, and those this proxy writes itself
_NOT_PASSED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "expect", "content-length", "server", "date"}


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.12, seed: int = 1, faults: tuple[str, ...] = FAULTS):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate, self.faults = rate, faults
        self.counts: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._outage_until = 0.0
        self._planned: list[str | None] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def outage(self, seconds: float) -> None:
        """From now on, for `seconds`, every request is reset."""
        self._outage_until = time.monotonic() + seconds

    def plan(self, faults: list[str | None]) -> None:
        """The fates of the next requests, in order (None: forwarded as it is)."""
        with self._lock:
            self._planned += faults

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _plan(self) -> str | None:
        """The fate of the next request: None (forward it as it is) or a fault."""
        with self._lock:
            self.counts["requests"] += 1
            if time.monotonic() < self._outage_until:
                return "outage"
            if self._planned:
                return self._planned.pop(0)
            return self._rng.choice(self.faults) if self._rng.random() < self.rate else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # a client that hung up first (a worker stopped mid long poll, a read timeout) is no news here
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.proxy._count("client_gone")
        else:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 uses its connections

    def log_message(self, *args) -> None:  # one line per request would drown the test's output
        pass

    def do_GET(self):
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        fault = proxy._plan()
        if fault in ("outage", "reset"):
            return self._reset(proxy, fault)
        if fault in ("500", "503"):
            return self._error(proxy, int(fault))
        status, headers, data = self._forward(body)
        if fault == "cut" and (self.command == "HEAD" or not data):
            fault = "reset_after"  # no body to cut
        if fault == "reset_after":
            return self._reset(proxy, fault)
        self.send_response_only(status)
        for name, value in headers.items():
            if name.lower() not in _NOT_PASSED:
                self.send_header(name, value)
        if self.command == "HEAD":  # the object's length, as moto said it, and no body
            self.send_header("Content-Length", headers.get("Content-Length", "0"))
            self.end_headers()
            return
        if fault == "cut":
            proxy._count("cut")
            self.send_header("Content-Length", str(len(data) + 64))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes):
        """The request to moto on a fresh connection: (status, headers, the whole body)."""
        conn = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_PASSED}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def _reset(self, proxy: FaultProxy, kind: str) -> None:
        """A TCP reset (RST, not a polite close): SO_LINGER 0, then close."""
        proxy._count(kind)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, proxy: FaultProxy, status: int) -> None:
        proxy._count(str(status))
        code = "InternalError" if status == 500 else "SlowDown"
        if "X-Amz-Target" in self.headers:  # SQS speaks JSON
            data = b'{"__type": "%s", "message": "injected by the fault proxy"}' % code.encode()
            kind = "application/x-amz-json-1.0"
        else:
            data = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>injected by the '
                    b'fault proxy</Message><RequestId>fault</RequestId></Error>' % code.encode())
            kind = "application/xml"
        self.send_response_only(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD never has a body, not even an error's
            self.wfile.write(data)
