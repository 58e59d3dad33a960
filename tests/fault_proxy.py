"""An HTTP proxy for tests that sits in front of a real server and injects faults at chosen rates:
429 with Retry-After, 500, 503, a stall past the client's time-out, a dropped connection, and a
200 whose JSON body is cut short. Requests whose body holds `always_fail_marker` always get a 500.
With `strip_logprobs`, answers lose their log-probabilities, like servers that do not give them."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "503", "stall", "drop", "truncate")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        rate: float = 0.0,
        seed: int = 0,
        stall_s: float = 6.0,
        always_fail_marker: str = "ALWAYS_FAIL",
        delay_s: float = 0.0,
        strip_logprobs: bool = False,
    ):
        self.strip_logprobs = strip_logprobs
        self.upstream_port = upstream_port
        self.delay_s = delay_s  # added to every forwarded answer: a slow server
        self.rate = rate
        self.stall_s = stall_s
        self.marker = always_fail_marker.encode()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.forwarded: list[bytes] = []  # request bodies that reached the server
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self, b"")

            def do_POST(self):
                proxy.handle(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pick_fault(self, body: bytes) -> str | None:
        if self.marker in body:
            return "500"
        with self.lock:
            if self.rng.random() >= self.rate:
                return None
            # Fault kinds take turns, so every kind shows up even in a short run.
            return FAULTS[sum(self.injected.values()) % len(FAULTS)]

    def handle(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        fault = self.pick_fault(body) if req.command == "POST" else None
        if fault:
            with self.lock:
                self.injected[fault] += 1
        if fault in ("429", "500", "503"):
            headers = {"Retry-After": "1"} if fault == "429" else {}
            return self.reply(
                req, int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode(), headers
            )
        if fault == "stall":
            time.sleep(self.stall_s)
        if fault in ("stall", "drop"):
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, payload = self.forward(req, body)
        if self.strip_logprobs and status == 200 and req.command == "POST":
            answer = json.loads(payload)
            for choice in answer.get("choices", []):
                choice["logprobs"] = None
            payload = json.dumps(answer).encode()
        if fault == "truncate":
            payload = payload[: len(payload) // 2]
        self.reply(req, status, payload, headers)

    def forward(self, req: BaseHTTPRequestHandler, body: bytes):
        with self.lock:
            if req.command == "POST":
                self.forwarded.append(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_HEADERS}
        conn.request(req.command, req.path, body=body or None, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        time.sleep(self.delay_s)
        out_headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_HEADERS}
        conn.close()
        return response.status, out_headers, payload

    @staticmethod
    def reply(req: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Type", headers.get("content-type", "application/json"))
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
