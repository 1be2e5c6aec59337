"""Semantic versions (semver 2.0.0) and version ranges for dependencies.

A range is one or more alternatives separated by ``||``; an alternative is
one or more comparators separated by commas or spaces, all of which must
hold. A comparator is ``>=1.0``, ``>1.0``, ``<2``, ``<=2.1``, ``=1.2.3``,
``==1.2.3``, ``!=1.3.0``, ``^1.2`` (same major; for 0.x, same minor),
``~1.2`` (same minor), a wildcard ``1.x``/``1.*``/``*``, or a bare version
(exactly it). Partial versions in comparators (``1``, ``1.2``) are padded
with zeros. As in npm and Cargo, pre-releases only match a comparator
that names a pre-release of the same major.minor.patch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# The regular expression recommended by semver.org, anchored.
VERSION_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_VERSION_RE = re.compile(VERSION_PATTERN)
_PARTIAL_RE = re.compile(
    r"^(?P<major>0|[1-9]\d*|[xX*])(?:\.(?P<minor>0|[1-9]\d*|[xX*])"
    r"(?:\.(?P<patch>0|[1-9]\d*|[xX*])(?:-(?P<pre>[0-9A-Za-z.-]+))?)?)?$"
)
_COMPARATOR_RE = re.compile(r"^(?P<op>>=|<=|==|!=|>|<|=|\^|~)?\s*(?P<version>\S+)$")


class VersionError(ValueError):
    """Text that is not a version or a version range."""


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    """A semantic version, ordered by semver 2.0.0 precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        match = _VERSION_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise VersionError(
                f'"{text}" is not a semantic version; use MAJOR.MINOR.PATCH with an '
                'optional -prerelease and +build, e.g. "1.2.0" or "2.0.0-rc.1"'
            )
        pre = tuple(match[4].split(".")) if match[4] else ()
        build = tuple(match[5].split(".")) if match[5] else ()
        return cls(int(match[1]), int(match[2]), int(match[3]), pre, build)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        # A release sorts after all of its pre-releases; numeric identifiers
        # sort below alphanumeric ones.
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validator(cls.parse, cls),
            serialization=core_schema.to_string_ser_schema(),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": VERSION_PATTERN}


@dataclass(frozen=True)
class _Comparator:
    op: str  # one of >=, >, <=, <, ==, !=
    version: Version

    def matches(self, version: Version) -> bool:
        v, c = version, self.version
        return {
            ">=": v >= c,
            ">": v > c,
            "<=": v <= c,
            "<": v < c,
            "==": v == c,
            "!=": v != c,
        }[self.op]


RANGE_MAX_LENGTH = 256
"""The longest version range (the CRD's maxLength)."""


@dataclass(frozen=True)
class VersionRange:
    """A set of versions written as a range, e.g. ``">=1.0,<2"`` or ``"^1.2"``."""

    text: str
    alternatives: tuple[tuple[_Comparator, ...], ...]

    @classmethod
    def parse(cls, text: str) -> VersionRange:
        if not isinstance(text, str) or not text.strip():
            raise VersionError(_range_help(text))
        if len(text) > RANGE_MAX_LENGTH:
            raise VersionError(f"a version range is at most {RANGE_MAX_LENGTH} characters")
        alternatives = []
        for alternative in text.split("||"):
            tokens = _tokens(alternative)
            if not tokens or any(not piece.strip() for piece in alternative.split(",")):
                raise VersionError(_range_help(text))
            comparators: list[_Comparator] = []
            for token in tokens:
                comparators.extend(_comparators(token, text))
            alternatives.append(tuple(comparators))
        return cls(text.strip(), tuple(alternatives))

    def __str__(self) -> str:
        return self.text

    def matches(self, version: Version) -> bool:
        """Whether ``version`` lies in the range."""
        return any(_alternative_matches(alt, version) for alt in self.alternatives)

    def best(self, versions: list[Version]) -> Version | None:
        """The highest of ``versions`` in the range, if any."""
        return max((v for v in versions if self.matches(v)), default=None)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validator(cls.parse, cls),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda r: r.text),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "minLength": 1, "maxLength": RANGE_MAX_LENGTH}


def _validator(parse: Any, cls: type) -> Any:
    def validate(value: object) -> object:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            # YAML reads 1.0 as a float and 1 as an int: say to quote it.
            raise VersionError(
                f"{value!r} is a {type(value).__name__}; write it as a quoted string"
            )
        return parse(value)

    return validate


def _range_help(text: object) -> str:
    return (
        f'"{text}" is not a version range; use comparators such as ">=1.0,<2", "^1.2", '
        '"~1.2.3", "1.x", "=1.2.3" or "*", and "||" between alternatives'
    )


def _tokens(alternative: str) -> list[str]:
    # Join an operator to the version after it: ">= 1.0" is one comparator.
    raw = alternative.replace(",", " ").split()
    tokens: list[str] = []
    for part in raw:
        if tokens and tokens[-1] in {">=", "<=", "==", "!=", ">", "<", "=", "^", "~"}:
            tokens[-1] += part
        else:
            tokens.append(part)
    return tokens


def _comparators(token: str, text: str) -> list[_Comparator]:
    match = _COMPARATOR_RE.match(token)
    if match is None:
        raise VersionError(_range_help(text))
    op = match["op"] or "="
    partial = _PARTIAL_RE.match(match["version"])
    if partial is None:
        raise VersionError(_range_help(text))
    parts = [partial["major"], partial["minor"], partial["patch"]]
    pre = tuple(partial["pre"].split(".")) if partial["pre"] else ()
    # Index of the first part that is missing or a wildcard.
    given = next((i for i, p in enumerate(parts) if p is None or p in "xX*"), 3)
    if any(p is not None and p not in "xX*" for p in parts[given:]):
        raise VersionError(_range_help(text))  # e.g. 1.x.3
    nums = [int(p) if i < given and p is not None else 0 for i, p in enumerate(parts)]
    low = Version(nums[0], nums[1], nums[2], pre if given == 3 else ())

    def upper(level: int) -> Version:
        # The first version past the given level: bump it, zero what follows.
        if level == 0:
            return Version(nums[0] + 1, 0, 0, ("0",))
        if level == 1:
            return Version(nums[0], nums[1] + 1, 0, ("0",))
        return Version(nums[0], nums[1], nums[2] + 1, ("0",))

    if given == 0:  # "*" or "x": any version
        return [] if op in {"=", "==", ">=", "<=", "^", "~"} else _never(op, text)
    if op in {"=", "=="}:
        if given == 3:
            return [_Comparator("==", low)]
        return [_Comparator(">=", low), _Comparator("<", upper(given - 1))]
    if op == "!=":
        if given != 3:
            raise VersionError(_range_help(text))
        return [_Comparator("!=", low)]
    if op == "^":
        # Same left-most non-zero part.
        if nums[0] > 0 or given == 1:
            level = 0
        elif nums[1] > 0 or given == 2:
            level = 1
        else:
            level = 2
        return [_Comparator(">=", low), _Comparator("<", upper(level))]
    if op == "~":
        level = 1 if given >= 2 else 0
        return [_Comparator(">=", low), _Comparator("<", upper(level))]
    if op == ">":
        return [_Comparator(">=" if given < 3 else ">", upper(given - 1) if given < 3 else low)]
    if op == "<=":
        return [_Comparator("<" if given < 3 else "<=", upper(given - 1) if given < 3 else low)]
    return [_Comparator(op, low)]  # ">=" or "<"


def _never(op: str, text: str) -> list[_Comparator]:
    raise VersionError(f'"{text}": "{op}*" matches nothing; {_range_help(text)}')


def _alternative_matches(comparators: tuple[_Comparator, ...], version: Version) -> bool:
    if not all(c.matches(version) for c in comparators):
        return False
    if not version.prerelease:
        return True
    # A pre-release only matches when a comparator names a pre-release of the
    # same major.minor.patch (npm's rule), so "^1.0" never picks "2.0.0-rc.1".
    return any(
        c.version.prerelease
        and (c.version.major, c.version.minor, c.version.patch)
        == (version.major, version.minor, version.patch)
        and c.version.prerelease != ("0",)
        for c in comparators
    )
