"""The Hugging Face hub, asked only when it answers.

Unreachable, huggingface_hub retries every file for about a minute, with a warning per try. vitrain checks
first: a TCP connection to the hub (``HF_ENDPOINT``, through the proxy when one is set) within 3 s, DNS
included. ``HF_HUB_OFFLINE=1`` skips the check. When the hub does not answer, this process goes offline, and
the client then reads its local cache at once, without retrying. Used for timm's pretrained weights
(:mod:`vitrain.models.weights`) and for ``data=hf`` hub ids (:mod:`vitrain.data.sources`).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from urllib.parse import urlparse

CHECK_SECONDS = 3.0  # the longest a connection check waits
_TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub reads as true in HF_HUB_OFFLINE


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT``, or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_env() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value: no network for the hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def reachable(url: str, timeout: float = CHECK_SECONDS) -> bool:
    """Whether the host of ``url`` (or the proxy the environment names for it) takes a TCP connection within
    ``timeout`` seconds, name lookup included (a thread bounds it: ``getaddrinfo`` has no timeout of its own)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname, via.port or 80
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout).close()
            answered.append(True)
        except (OSError, UnicodeError):
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answered)


def go_offline() -> None:
    """Put this process's huggingface_hub in offline mode: downloads read the local cache, nothing is retried.
    (The client reads ``HF_HUB_OFFLINE`` when imported; its constant is set as well.)"""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def hub_online(timeout: float = CHECK_SECONDS) -> bool:
    """Whether downloads from the hub may go ahead: False at once with ``HF_HUB_OFFLINE=1``, else the connection
    check. Offline either way, the process is put in offline mode (:func:`go_offline`), so the client reads its
    cache without retrying."""
    if not offline_by_env() and reachable(endpoint(), timeout):
        return True
    go_offline()
    return False
