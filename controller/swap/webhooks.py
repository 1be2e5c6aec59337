"""The swap's webhooks (``spec.hotSwap.webhooks``): HTTP POSTs at its steps, as Flagger's.

A :class:`Sender` is made once, with the reconciler, from the secret file
given to the controller (``bhctl run --webhook-secret FILE``); the swap
coordinator calls :meth:`Sender.send` at PrePromotion (before the flip),
PostPromotion (when the scale-down window has passed, before the old color
is removed) and Rollback (after a rollback, to tell). Each POST carries a
JSON body about the swap and, with a secret, the header
``X-Blackhole-Signature-256: sha256=HEX``: the HMAC-SHA256 of the raw body
with the secret, which a receiver recomputes (GitHub's scheme).

A hook's answer is a 2xx (yes) or anything else (no). Connection errors,
timeouts and 5xx answers are tried again ``retries`` times with exponential
backoff; a 4xx is an answer and is not. Only http and https URLs are sent
to, and never to a link-local address (the cloud metadata endpoints among
them), whatever a name resolves to.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import tenacity
from aiohttp import abc as aiohttp_abc

from controller.errors import ControllerError
from controller.spec import models

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Blackhole-Signature-256"
DELIVERY_HEADER = "X-Blackhole-Delivery"
FIRST_BACKOFF = 0.2
"""Seconds before the first retry; each next one waits twice as long, up to LONGEST_BACKOFF."""
LONGEST_BACKOFF = 5.0
ANSWER_KEPT = 300
"""Characters of a hook's answer kept in the message that says it said no."""


class WebhookSecretError(ControllerError):
    """The webhook secret file cannot be used."""


def read_secret(path: Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace dropped); refused when others may read it."""
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except OSError as e:
        raise WebhookSecretError(f"--webhook-secret {path}: {e.strerror or e}") from e
    if mode & 0o077:
        raise WebhookSecretError(
            f"--webhook-secret {path}: mode {mode & 0o777:o} lets others read it; chmod 600 {path}"
        )
    if len(secret) < 16:
        raise WebhookSecretError(
            f"--webhook-secret {path}: {len(secret)} bytes; use at least 16 random bytes, "
            "e.g. `openssl rand -hex 32`"
        )
    return secret


def signature(secret: bytes, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What one hook answered, after its retries."""

    hook: models.Webhook
    ok: bool
    message: str
    """Its status and the start of its answer, or why it could not be reached."""
    attempts: int


class _Retry(Exception):
    """A failure worth another attempt (no connection, a timeout, a 5xx)."""


class _NoLinkLocal(aiohttp_abc.AbstractResolver):
    """Resolves names as the system does, refusing link-local addresses (metadata endpoints)."""

    def __init__(self) -> None:
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp_abc.ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        kept = [r for r in found if not models.link_local(r["host"])]
        if not kept:
            raise OSError(f"{host} resolves to link-local addresses only: refused")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


class Sender:
    """Sends webhooks, signed with ``secret`` (none: unsigned)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_NoLinkLocal(), limit=32),
                headers={"User-Agent": "blackhole-controller"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, hooks: list[models.Webhook], type: str, about: dict[str, Any]
    ) -> list[Outcome]:
        """Call every hook of ``type``, each with the body ``about`` plus who it is, at once."""
        chosen = [h for h in hooks if h.type == type]
        if not chosen:
            return []
        return list(await asyncio.gather(*(self._one(hook, about) for hook in chosen)))

    async def _one(self, hook: models.Webhook, about: dict[str, Any]) -> Outcome:
        delivery = str(uuid.uuid4())
        body = json.dumps(
            {
                "apiVersion": models.API_VERSION,
                "kind": "SwapWebhook",
                "id": delivery,
                "name": hook.name,
                "type": hook.type,
                "time": datetime.now(UTC).isoformat(),
                **about,
            },
            separators=(",", ":"),
        ).encode()
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        attempts = 0
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(hook.retries + 1),
            wait=tenacity.wait_exponential(multiplier=FIRST_BACKOFF, max=LONGEST_BACKOFF),
            retry=tenacity.retry_if_exception_type(_Retry),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    status, text = await self._post(hook, body, headers)
                    if status >= 500:
                        raise _Retry(f"HTTP {status}: {text}")
        except _Retry as e:
            return Outcome(hook, False, str(e), attempts)
        ok = 200 <= status < 300
        return Outcome(hook, ok, f"HTTP {status}" + (f": {text}" if text else ""), attempts)

    async def _post(
        self, hook: models.Webhook, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str]:
        try:
            async with self._client().post(
                hook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=float(hook.timeout_seconds)),
                allow_redirects=False,
            ) as response:
                raw = await response.content.read(ANSWER_KEPT)
                return response.status, raw.decode(errors="replace").strip()
        except TimeoutError:
            raise _Retry(f"no answer within timeoutSeconds ({hook.timeout_seconds}s)") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Retry(f"not reached: {e}") from None
