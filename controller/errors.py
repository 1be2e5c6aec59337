"""The controller's one error hierarchy, rooted at :class:`ControllerError`.

Every layer raises these; errors of third-party clients (docker-py, the
Kubernetes client) are translated at the backend boundary with ``from e``
so that nothing above a backend ever sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ControllerError(Exception):
    """Base of every error the controller raises on purpose."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem found in a spec: where it is, what was there and what is allowed."""

    source: str
    """The file (or other origin) the spec came from."""
    document: int | None
    """1-based index of the YAML document within the file, if known."""
    path: str
    """Dotted field path, e.g. ``spec.resources.memory``; empty for the whole document."""
    message: str
    """What is wrong and what would be right."""
    value: object = None
    """The offending value, when there is one."""
    has_value: bool = False
    line: int | None = None
    """1-based line in the file where the field (or the document) starts, if known."""

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
        if self.document is not None:
            where += f" (document {self.document})"
        field = f"{self.path}: " if self.path else ""
        shown = f" (got {_show(self.value)})" if self.has_value else ""
        return f"{where}: {field}{self.message}{shown}"


def _show(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 80 else text[:77] + "..."


class SpecError(ControllerError):
    """A spec is invalid. Carries every issue found, not just the first."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class RuntimeBackendError(ControllerError):
    """A container engine or other runtime failed or refused an operation."""


class EngineUnavailableError(RuntimeBackendError):
    """The runtime's engine cannot be reached at all."""


class InstanceNotFoundError(RuntimeBackendError):
    """The instance asked for does not exist in the runtime."""


class InstanceConflictError(RuntimeBackendError):
    """An instance of that name exists already (another pass, or a controller before a crash)."""


class TemporaryError(ControllerError):
    """A reconcile pass failed in a way worth retrying: requeue the key with backoff.

    ``delay`` overrides the backoff when the cause says how long to wait.
    """

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ControllerError):
    """A reconcile pass cannot succeed until the spec changes: do not retry hot."""


class PluginCallError(ControllerError):
    """A call over the plugin protocol failed; ``code`` is the gRPC status code's name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IncompatiblePluginError(ControllerError):
    """The plugin's handshake says it cannot work with this controller or its spec."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RegistryError(ControllerError):
    """The plugin registry cannot do what was asked: a source failed, a bundle is unreadable."""


class BundleRefusedError(RegistryError):
    """A bundle failed a check before anything of it ran; ``reason`` is a CamelCase word.

    Reasons: ``BadSignature``, ``UntrustedKey``, ``Unsigned``, ``ImageDigestMismatch``,
    ``PermissionDenied``, ``ResourcesExceeded``, ``ProtocolUnsupported``,
    ``DependencyCycle``, ``DependencyUnsatisfiable``, ``DependencyConflict``,
    ``InvalidBundle``, ``BundleNotFound``, ``BundleMismatch``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreUnavailableError(ControllerError):
    """One of the controller's SQLite files cannot be read or written now.

    ``reason`` is a CamelCase word: ``DiskFull``, ``ReadOnly``, ``IOError``,
    ``Damaged``, ``CannotOpen`` or ``Busy``. Retried with backoff by whoever
    needs the store; what runs is left as it is meanwhile.
    """

    def __init__(self, store: str, path: str, operation: str, reason: str, message: str) -> None:
        super().__init__(f"{path}: {operation}: {message} ({reason})")
        self.store = store
        self.path = path
        self.operation = operation
        self.reason = reason
