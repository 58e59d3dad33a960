"""Where a pipeline sends API keys. A pipeline names a key by its environment variable and the URL it
goes to: one written elsewhere could send any variable anywhere, so `cai run` says which key goes to
which host before it sends anything, unless that host is this machine."""

from __future__ import annotations

import ipaddress
from typing import Iterable
from urllib.parse import urlsplit

from cai.generate.backends.base import BackendSpec
from cai.generate.backends.openai_api import base_urls
from cai.generate.config import PipelineConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def used_backends(config: PipelineConfig) -> list[BackendSpec]:
    """The backends a pipeline's roles use."""
    return [config.backends[name] for name in sorted(set(config.roles.values()))]


def key_destinations(specs: Iterable[BackendSpec]) -> list[str]:
    """One line per backend that sends a key off this machine: `backend 'x' sends $VAR to host`."""
    lines = []
    for name, settings in sorted({spec.name: spec.settings for spec in specs}.items()):
        variable = settings.get("api_key_env")
        if not variable:
            continue
        # host[:port] without any user:password@ a URL may hold
        hosts = sorted(
            {
                urlsplit(u).netloc.rpartition("@")[2]
                for u in base_urls(settings)
                if not is_loopback(urlsplit(u).hostname or "")
            }
        )
        if hosts:
            lines.append(f"backend {name!r} sends ${variable} to {', '.join(hosts)}")
    return lines
