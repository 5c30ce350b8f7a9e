"""The Hugging Face hub, asked only when it can answer.

Where the hub cannot be reached, its client retries each request five times with backoff (about 23 s) and logs two
lines per try before the caller learns anything. So before a library is handed a hub id, ``use_hub`` tries one short
TCP connect to the hub (or the proxy that would carry the request); where that fails, it switches the hub client,
``transformers`` and ``datasets`` to offline mode, so a cached copy loads at once and a missing one fails at once,
and ``missing`` says so in one line: the id, that the hub cannot be reached, and what to do.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from functools import cache
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from .errors import UserError

CONNECT_TIMEOUT_S = 2.0  # one connect, not a download: a reachable hub answers a SYN well within this
DEFAULT_ENDPOINT = "https://huggingface.co"
_switched_offline = False  # offline mode was switched on here, not by the user's HF_HUB_OFFLINE


class HubUnreachable(UserError):
    """A hub id that is not in the local cache, on a machine where the hub cannot be reached."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """Offline mode as the hub client reads it (HF_HUB_OFFLINE, or set by ``use_hub``)."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _connect_target(url: str) -> tuple[str, int]:
    """Host and port the first packet of a request to ``url`` goes to: the proxy's where one applies."""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _resolve(host: str, port: int, timeout: float) -> list:
    """The addresses of ``host``, or [] where it does not resolve within ``timeout`` (a resolver that cannot be
    reached can take tens of seconds to say so, and getaddrinfo has no timeout of its own)."""
    found: list = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError:
            pass

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    return list(found)


@cache
def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether one TCP connect to ``url``'s host (or its proxy) succeeds within ``timeout``; asked once a process."""
    host, port = _connect_target(url)
    for family, kind, proto, _, address in _resolve(host, port, timeout)[:2]:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
                return True
        except OSError:  # refused, unroutable or timed out
            continue
    return False


def go_offline() -> None:
    """Offline mode for the hub client, transformers (which asks the hub client) and datasets, from now on."""
    global _switched_offline
    _switched_offline = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later, and for child processes
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def use_hub() -> bool:
    """Call before a library is handed a hub id: True where the hub can be asked; False (offline mode, switched on
    here if the hub cannot be reached) where only the local cache can answer."""
    if offline():
        return False
    if reachable(endpoint()):
        return True
    go_offline()
    return False


def hub_cache() -> str:
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def missing(key: str, repo_id: str, repo_type: str = "model", cache: str | None = None) -> HubUnreachable:
    """The one line for a hub id the local cache (``cache``, else the hub client's) lacks while the hub cannot be
    asked."""
    why = f"the hub ({endpoint()}) cannot be reached" if _switched_offline else "offline mode is on (HF_HUB_OFFLINE)"
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    where = cache or hub_cache()
    return HubUnreachable(f"{key}: {repo_id} is not in the local Hugging Face cache ({where}) and {why}; "
                          f"download it on a machine with network (hf download {repo_id}{flag}) and copy the cache "
                          "or point HF_HOME at it, or give a local path")
