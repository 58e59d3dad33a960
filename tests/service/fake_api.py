"""An OpenAI-compatible chat server on 127.0.0.1 that answers every chat with the same short text and
records where each request went and which bearer token it carried: where a key went is what the
security tests check. It doubles as a hostile capture server: it answers whoever calls."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "tiny"
HOLD_LIMIT_S = 60.0  # a held /models request is let go after this, whatever the test does


class FakeAPI:
    def __init__(self, answer: str = "A short, careful answer."):
        self.answer = answer
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization header)
        self.lock = threading.Lock()
        # Cleared: GET /models waits until set (bounded), so a test can look at a job while it is alive.
        self.release = threading.Event()
        self.release.set()
        self.held = threading.Event()  # a GET /models is waiting
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                api.record(self)
                if self.path.rstrip("/").endswith("/models"):
                    api.held.set()
                    api.release.wait(HOLD_LIMIT_S)
                    self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]})
                else:
                    self.reply(404, {"error": {"message": f"no {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                api.record(self)
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": api.answer}, "finish_reason": "stop"}
                    for i in range(body.get("n", 1))
                ]
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                self.reply(
                    200,
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": MODEL,
                        "choices": choices,
                        "usage": usage,
                    },
                )

            def reply(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the job was stopped while it waited
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((handler.command, handler.path, handler.headers.get("Authorization", "")))

    def tokens(self) -> set[str]:
        """Every Authorization header this server was sent."""
        with self.lock:
            return {auth for _, _, auth in self.requests}

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
