"""The terminal side of the API (`cai submit`, `cai jobs`): JSON over HTTP with the standard library."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from cai.service.server import READ_TOKEN_ENV, TOKEN_ENV


class ServerError(Exception):
    """The server refused (its one-line `detail`, with `status`) or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def call(server: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Accept": "application/json"}
    token = os.environ.get(TOKEN_ENV) or os.environ.get(READ_TOKEN_ENV)  # a reader may hold only the read token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(server.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = None
        raise ServerError(detail if isinstance(detail, str) else f"HTTP {exc.code} {exc.reason}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach {server}: {reason}") from None


def job_line(job: dict[str, Any]) -> str:
    p = job["progress"]
    return f"{job['id']:>5}  {job['status']:<11} {p['fraction'] * 100:5.1f}%  {job['kind']:<4} {job['target']}  -> {job['out_dir']}"
