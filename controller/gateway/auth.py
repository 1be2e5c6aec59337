"""Bearer tokens for the gateway, each with the plugins it may call.

The tokens file (``bhctl run --gateway-tokens FILE``) is YAML::

    tokens:
      - name: billing-service          # shown in logs, never the token
        sha256: 9f86d08...             # sha256 of the token (or `token:` in clear)
        plugins: [kv-store, analytics] # or ["*"] for every plugin
        preview: true                  # may call a swap's new color before promotion
        dashboard: admin               # may act in the dashboard (promote, abort, undo, retry)
      - name: reports                  # a caller known by its client certificate
        certificates: [reports.example.com, "spiffe://example.com/reports"]
        plugins: [analytics]

An entry's ``certificates:`` are names of client certificates (a SAN, DNS,
URI, email or IP, or the subject's common name) that stand for it on a
listener that requires client certificates (``--gateway-tls-client-ca``,
:mod:`controller.gateway.tls`): a call that sends no bearer token is the
entry one of its verified certificate's names is listed in. An entry has a
token, certificates, or both; no name may be listed twice. A call that sends
a token is known by the token alone.

Without a tokens file the gateway takes calls without authentication, and
then only on a loopback address. Tokens are compared by their sha256 in
constant time. The dashboard (``bhctl run --dashboard-addr``) reads the same
file: only a token with ``dashboard: admin`` may act there; without one it is
read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from dataclasses import dataclass
from pathlib import Path

from controller.errors import ControllerError, SpecError
from controller.spec import safe_yaml

DASHBOARD_ADMIN = "admin"
"""The value of a token's ``dashboard:`` that lets it act in the dashboard."""


class TokensFileError(ControllerError):
    """The tokens file cannot be used."""


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str | None
    """None for an entry known only by its client certificates."""
    plugins: frozenset[str]
    preview: bool = False
    """Whether it may call a swap's new color before promotion (a preview call)."""
    dashboard_admin: bool = False
    """Whether it may act in the dashboard: promote, abort, undo and retry swaps."""
    certificates: frozenset[str] = frozenset()
    """Names of the client certificates that stand for it (SAN values, subject CN)."""

    def allows(self, plugin: str) -> bool:
        return "*" in self.plugins or plugin in self.plugins


class Tokens:
    """The known tokens, looked up by the sha256 of what a caller presents."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self._by_certificate = {name: t for t in tokens for name in t.certificates}

    def find(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for token in self.tokens:  # every one compared, so timing says nothing
            if token.sha256 is not None and hmac.compare_digest(token.sha256, digest):
                found = token
        return found

    def by_certificate(self, names: frozenset[str]) -> Token | None:
        """The entry that lists one of a verified client certificate's ``names`` (the first
        in the file when several would)."""
        found = [self._by_certificate[name] for name in names if name in self._by_certificate]
        return min(found, key=self.tokens.index) if found else None

    @classmethod
    def load(cls, path: Path) -> Tokens:
        try:
            mode = path.stat().st_mode
            with path.open("rb") as handle:
                data = handle.read(safe_yaml.MAX_BYTES + 1)
            document = safe_yaml.load_one(data, str(path))
        except OSError as e:
            raise TokensFileError(f"{path}: {e}") from e
        except SpecError as e:
            raise TokensFileError(str(e)) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokensFileError(
                f"{path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
            )
        entries = (document or {}).get("tokens") if isinstance(document, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TokensFileError(f'{path}: expected "tokens:" with a list of tokens')
        tokens = []
        seen: dict[str, str] = {}
        """Certificate names listed so far, and by which entry."""
        for index, entry in enumerate(entries):
            where = f"{path}: tokens[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise TokensFileError(f"{where}: needs a name")
            certificates = entry.get("certificates", [])
            if not isinstance(certificates, list) or not all(
                isinstance(c, str) and c for c in certificates
            ):
                raise TokensFileError(f"{where}.certificates: a list of certificate names")
            for certificate in certificates:
                if certificate in seen:
                    raise TokensFileError(
                        f"{where}.certificates: {certificate!r} is listed by {seen[certificate]}"
                        " too"
                    )
                seen[certificate] = entry["name"]
            digest: str | None = None
            if "sha256" in entry:
                digest = str(entry["sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise TokensFileError(f"{where}.sha256: not a sha256 in hex")
            elif isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
                digest = hashlib.sha256(entry["token"].encode()).hexdigest()
            elif "token" in entry or not certificates:
                raise TokensFileError(
                    f"{where}: needs sha256, a token of 16 characters or more, or certificates"
                )
            plugins = entry.get("plugins")
            if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
                raise TokensFileError(f'{where}.plugins: a list of plugin names, or ["*"]')
            preview = entry.get("preview", False)
            if not isinstance(preview, bool):
                raise TokensFileError(f"{where}.preview: true or false")
            dashboard = entry.get("dashboard")
            if dashboard not in (None, DASHBOARD_ADMIN):
                raise TokensFileError(f'{where}.dashboard: "{DASHBOARD_ADMIN}" or left out')
            tokens.append(
                Token(
                    entry["name"],
                    digest,
                    frozenset(plugins),
                    preview,
                    dashboard_admin=dashboard == DASHBOARD_ADMIN,
                    certificates=frozenset(certificates),
                )
            )
        return cls(tokens)
