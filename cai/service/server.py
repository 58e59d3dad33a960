"""`cai serve`: checks that make the server safe to start, then uvicorn."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cai.core.errors import InputError
from cai.generate.keys import is_loopback
from cai.service.jobs import DEFAULT_MAX_QUEUED
from cai.service.policy import load_backends
from cai.service.tokens import LABEL_TOKENS_ENV, parse_label_tokens
from cai.service.workspace import Workspace

TOKEN_ENV = "CAI_SERVER_TOKEN"
READ_TOKEN_ENV = "CAI_SERVER_READ_TOKEN"


@dataclass(frozen=True)
class ServeOptions:
    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8420
    max_jobs: int = 1
    max_queued: int = DEFAULT_MAX_QUEUED
    backends: Path | None = None  # the operator's file of API backends jobs may use


class UnsafeServe(Exception):
    """A server that would be reachable from other machines without a token, or tokens that make no sense."""


class _NoQueryStrings(logging.Filter):
    """uvicorn's access log prints each request's path with its query string, which holds the token on
    the dashboard's first visit (`/?token=...`): log the path alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], record.args[2].split("?", 1)[0], *record.args[3:])
        return True


def serve(options: ServeOptions) -> None:
    import uvicorn

    from cai.service.app import ServiceConfig, create_app

    token = os.environ.get(TOKEN_ENV) or None
    read_token = os.environ.get(READ_TOKEN_ENV) or None
    if token is None and not is_loopback(options.host):
        raise UnsafeServe(f"--host {options.host} is reachable from other machines: set {TOKEN_ENV} to a secret first")
    if read_token is not None and (token is None or read_token == token):
        raise UnsafeServe(f"{READ_TOKEN_ENV} is the read-only token beside {TOKEN_ENV}: set both, to different secrets")
    label_tokens = os.environ.get(LABEL_TOKENS_ENV, "").strip()
    if label_tokens and token is None:
        raise UnsafeServe(f"{LABEL_TOKENS_ENV} holds labelers' tokens beside {TOKEN_ENV}: set {TOKEN_ENV} too")
    labelers = parse_label_tokens(label_tokens, (token, read_token)) if label_tokens else {}
    backends = load_backends(options.backends) if options.backends else {}
    workspace = Workspace.open(options.workspace, backends)
    if not os.access(workspace.root, os.W_OK):
        raise InputError(str(options.workspace), None, "workspace folder is not writable")
    # Jobs run in the workspace and resolve a pipeline's relative paths from there; validating a
    # submission from the same folder makes it see the same files the job will.
    os.chdir(workspace.root)
    app = create_app(ServiceConfig(workspace, token, read_token, labelers, options.max_jobs, options.max_queued))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("uvicorn.access").addFilter(_NoQueryStrings())
    print(f"cai serve: workspace {workspace.root}, http://{options.host}:{options.port}/ (API docs: /docs)", flush=True)
    if labelers:
        print(f"cai serve: labelers {', '.join(labelers)}", flush=True)
    for backend in backends.values():
        print(f"cai serve: jobs may use API backend {backend.describe()}", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
