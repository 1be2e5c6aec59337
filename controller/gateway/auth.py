"""Bearer tokens for the gateway, each with the plugins it may call.

The tokens file (``bhctl run --gateway-tokens FILE``) is YAML::

    tokens:
      - name: billing-service          # shown in logs, never the token
        sha256: 9f86d08...             # sha256 of the token (or `token:` in clear)
        plugins: [kv-store, analytics] # or ["*"] for every plugin
        preview: true                  # may call a swap's new color before promotion
        dashboard: admin               # may act in the dashboard (promote, abort, undo, retry)

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
    sha256: str
    plugins: frozenset[str]
    preview: bool = False
    """Whether it may call a swap's new color before promotion (a preview call)."""
    dashboard_admin: bool = False
    """Whether it may act in the dashboard: promote, abort, undo and retry swaps."""

    def allows(self, plugin: str) -> bool:
        return "*" in self.plugins or plugin in self.plugins


class Tokens:
    """The known tokens, looked up by the sha256 of what a caller presents."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens

    def find(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for token in self.tokens:  # every one compared, so timing says nothing
            if hmac.compare_digest(token.sha256, digest):
                found = token
        return found

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
        for index, entry in enumerate(entries):
            where = f"{path}: tokens[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise TokensFileError(f"{where}: needs a name")
            if "sha256" in entry:
                digest = str(entry["sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise TokensFileError(f"{where}.sha256: not a sha256 in hex")
            elif isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
                digest = hashlib.sha256(entry["token"].encode()).hexdigest()
            else:
                raise TokensFileError(f"{where}: needs sha256, or a token of 16 characters or more")
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
                )
            )
        return cls(tokens)
