"""Who a request comes from, and what its token's scope lets it do. Three scopes:
- `submit` ($CAI_SERVER_TOKEN, the operator): everything;
- `read` ($CAI_SERVER_READ_TOKEN): GET and HEAD only (dashboard, jobs, logs, downloads, label figures);
- `label` ($CAI_SERVER_LABEL_TOKENS, one token per labeler, `name=token` entries): the dashboard and
  the labeling flow (its tasks, its next pair, its answers), nothing else: no job, log or file, and
  no other labeler's labels. Labels carry the labeler's name, so each person has their own token.
Every other route refuses a label token with 403; an allow-list, so a route added later is closed to
labelers until someone opens it here."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cai.core.errors import InputError

SUBMIT, READ, LABEL = "submit", "read", "label"
OPERATOR = "operator"  # the name the submit token labels under (and every request, without tokens)
READ_METHODS = ("GET", "HEAD")
LABEL_TOKENS_ENV = "CAI_SERVER_LABEL_TOKENS"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_TOKEN_CHARS = 16

# (methods, path) a label token may use; paths as the app routes them.
LABEL_ROUTES = tuple(
    (methods, re.compile(path))
    for methods, path in (
        (READ_METHODS, r"/"),
        (READ_METHODS, r"/static/[A-Za-z0-9_.-]+"),
        (READ_METHODS, r"/api/access"),
        (READ_METHODS, r"/api/tasks"),
        (("POST",), r"/api/tasks/\d+/next"),
        (("POST",), r"/api/assignments/\d+"),
    )
)


@dataclass(frozen=True)
class Principal:
    scope: str
    name: str  # a labeler's name; OPERATOR for the submit token, "reader" for the read token


@dataclass(frozen=True)
class Tokens:
    submit: str | None  # None: no authentication (loopback only; cai serve enforces that)
    read: str | None = None
    label: Mapping[str, str] = field(default_factory=dict)  # labeler name -> token

    def identify(self, given: str) -> Principal | None:
        """The principal `given` is a token of; None: not a token of this server. Every token is
        compared, in constant time, so the answer's timing tells nothing of which one came close."""
        if self.submit is None:
            return Principal(SUBMIT, OPERATOR)
        found = Principal(SUBMIT, OPERATOR) if _same(given, self.submit) else None
        if self.read is not None and _same(given, self.read):
            found = Principal(READ, "reader")
        for name, token in self.label.items():
            if _same(given, token):
                found = Principal(LABEL, name)
        return found


def allowed(principal: Principal, method: str, path: str) -> str | None:
    """None when the principal's scope allows the request, else why not (a 403's message)."""
    if principal.scope == READ and method not in READ_METHODS:
        return "this token is read-only: submitting, cancelling and resuming jobs need $CAI_SERVER_TOKEN"
    if principal.scope == LABEL and not any(
        method in methods and pattern.fullmatch(path) for methods, pattern in LABEL_ROUTES
    ):
        return "this token labels pairs only: jobs, logs, files and label figures need another token"
    return None


def parse_label_tokens(value: str, others: tuple[str | None, ...]) -> dict[str, str]:
    """`name=token` entries, separated by commas or whitespace, as $CAI_SERVER_LABEL_TOKENS holds them.
    Names and tokens unique, tokens long and none equal to the submit or read token."""
    out: dict[str, str] = {}
    for entry in re.split(r"[,\s]+", value.strip()):
        name, sep, token = entry.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise InputError(
                LABEL_TOKENS_ENV,
                None,
                f"{name or entry!r}: expected NAME=TOKEN entries, a name of letters, digits, _.-",
            )
        if name == OPERATOR or name in out:
            raise InputError(LABEL_TOKENS_ENV, name, "a labeler named twice, or named 'operator' (the submit token's)")
        if len(token) < MIN_TOKEN_CHARS:
            raise InputError(LABEL_TOKENS_ENV, name, f"the token is shorter than {MIN_TOKEN_CHARS} characters")
        if token in out.values() or token in others:
            raise InputError(LABEL_TOKENS_ENV, name, "the token is another token of this server: give each its own")
        out[name] = token
    return out


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())
