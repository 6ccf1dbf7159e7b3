"""Who a client is, and how many images each client may have waiting.

On a public server one visitor with a script could otherwise fill the queue everyone shares.
The front end keys each request by its client (`client_key`), admits it through `Admission`
(at most `max_images_per_client` images queued or running per client) and releases it when
the request ends; the scheduler then takes the clients' images round-robin into its decoding
loops (dalle_app.scheduler). This module knows nothing of Gradio or the models, so any front
end (the Gradio app, a Ray Serve ingress) can use it.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from typing import Mapping

DEFAULT_MAX_IMAGES_PER_CLIENT = 32
"""Images one client may have queued or running (two 16-image requests)."""
MAX_IMAGES_PER_CLIENT_ENV = "DALLE_APP_MAX_IMAGES_PER_CLIENT"
IPV6_CLIENT_PREFIX = 64
"""An IPv6 visitor usually holds a whole /64, so its addresses count as one client."""
UNKNOWN_CLIENT = "unknown"
"""The key of requests that carry no user, usable address or session."""


class ClientLimitError(RuntimeError):
    """A request that would take its client past `max_images_per_client`; the message names
    the limit and says what to do."""


def positive_int_env(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number ≥ 1 from the environment variable `name`, `default` when it is unset."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number ≥ 1 (got {text!r}); unset it for {default}.")
    return value


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


def _address_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{ip}/{IPV6_CLIENT_PREFIX}', strict=False)}"
    return f"ip:{ip}"


def client_address(host: str | None, forwarded_for: str | None) -> str | None:
    """The visitor's address, or None for a loopback connection that forwards no public one.

    `host` is the address the connection came from; `forwarded_for` the X-Forwarded-For header.
    A public `host` is the visitor itself (its own X-Forwarded-For is ignored: anyone can send
    one). A private or loopback `host` is a proxy in front of the app (a Space's, a local
    reverse proxy): the visitor is the last public address in X-Forwarded-For, the one the
    proxy appended (the entries before it are whatever the visitor sent). A private `host`
    without a public forwarded address is a visitor on the local network.
    """
    peer = _ip(host)
    if peer is not None and peer.is_global:
        return _address_key(peer)
    for entry in reversed((forwarded_for or "").split(",")):
        forwarded = _ip(entry)
        if forwarded is not None and forwarded.is_global:
            return _address_key(forwarded)
    if peer is not None and not peer.is_loopback:
        return _address_key(peer)
    return None


def client_key(*, username: str | None = None, host: str | None = None, forwarded_for: str | None = None,
               session: str | None = None) -> str:
    """Whose request this is: the logged-in user, else the visitor's address
    (`client_address`), else the browser session (every visitor of an app served on
    loopback has the same address), else UNKNOWN_CLIENT."""
    if username:
        return f"user:{username}"
    address = client_address(host, forwarded_for)
    if address is not None:
        return address
    if session:
        return f"session:{session}"
    return UNKNOWN_CLIENT


class Ticket:
    """One admitted request's images, counted against its client until `release()`."""

    def __init__(self, admission: "Admission", client: str, images: int) -> None:
        self._admission, self.client, self.images = admission, client, images
        self._released = False

    def release(self) -> None:
        """Give the images back (the request is over); calling it again does nothing."""
        if not self._released:
            self._released = True
            self._admission._release(self.client, self.images)


class Admission:
    """Counts each client's images queued or running and refuses what would pass the limit.

    Thread-safe. The front end calls `admit` before a request reaches a scheduler and releases
    its ticket when the request ends (done, failed, cancelled or disconnected).
    """

    def __init__(self, max_images_per_client: int = DEFAULT_MAX_IMAGES_PER_CLIENT) -> None:
        if max_images_per_client < 1:
            raise ValueError("max_images_per_client must be ≥ 1")
        self.max_images_per_client = max_images_per_client
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Admission":
        """The limit from $DALLE_APP_MAX_IMAGES_PER_CLIENT (default 32)."""
        return cls(positive_int_env(env, MAX_IMAGES_PER_CLIENT_ENV, DEFAULT_MAX_IMAGES_PER_CLIENT))

    def waiting(self, client: str) -> int:
        """Images of `client` admitted and not yet released."""
        with self._lock:
            return self._held.get(client, 0)

    def admit(self, client: str, images: int) -> Ticket:
        """Count `images` more for `client`, or raise ClientLimitError if that passes the limit."""
        limit = self.max_images_per_client
        with self._lock:
            held = self._held.get(client, 0)
            if held + images > limit:
                if images > limit:
                    raise ClientLimitError(
                        f"At most {limit} images can wait per visitor; ask for {limit} or fewer.")
                raise ClientLimitError(
                    f"You already have {held} images waiting (at most {limit} per visitor); "
                    "try again when they are done.")
            self._held[client] = held + images
        return Ticket(self, client, images)

    def _release(self, client: str, images: int) -> None:
        with self._lock:
            left = self._held.get(client, 0) - images
            if left > 0:
                self._held[client] = left
            else:
                self._held.pop(client, None)


__all__ = [
    "Admission", "ClientLimitError", "DEFAULT_MAX_IMAGES_PER_CLIENT", "MAX_IMAGES_PER_CLIENT_ENV", "Ticket",
    "UNKNOWN_CLIENT", "client_address", "client_key", "positive_int_env",
]
