"""Kubernetes resource quantities (``500m``, ``0.5``, ``256Mi``, ``1Gi``, ``1e3``).

Parses the same grammar as apimachinery's ``resource.Quantity``: a signed
decimal number followed by a binary suffix (Ki..Ei), a decimal suffix
(n, u, m, k, M, G, T, P, E) or a decimal exponent (``e3``/``E3``).
:class:`Quantity` keeps the text the user wrote, so specs round-trip
unchanged, and exposes the exact value as a :class:`~decimal.Decimal`.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}

# apimachinery's grammar: <signedNumber><suffix>, suffix = binarySI | decimalSI | decimalExponent.
PATTERN = (
    r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_RE = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity."""


class Quantity:
    """An exact Kubernetes quantity, remembering how it was written."""

    __slots__ = ("text", "value")

    def __init__(self, text: str | int | float) -> None:
        self.text = _normalise_text(text)
        self.value = parse(self.text)

    def __repr__(self) -> str:
        return f"Quantity({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Quantity):
            return self.value == other.value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)

    def as_int(self) -> int:
        """The value rounded up to a whole number (bytes, pids): ``1.5Ki`` -> 1536."""
        return math.ceil(self.value)

    def as_millis(self) -> int:
        """The value in thousandths, rounded up (CPU millicores): ``0.5`` -> 500."""
        return math.ceil(self.value * 1000)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda q: q.text, when_used="always"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # The shape Kubernetes itself uses for quantities in CRDs.
        return {
            "anyOf": [{"type": "integer"}, {"type": "string", "pattern": PATTERN}],
            "x-kubernetes-int-or-string": True,
        }

    @classmethod
    def _validate(cls, value: object) -> Quantity:
        if isinstance(value, Quantity):
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise QuantityError(
                f"{_describe(value)} is not a quantity; use a number or a string such as "
                '"500m", "0.5", "256Mi" or "1Gi"'
            )
        return cls(value)


def _describe(value: object) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, str) else f'"{value}"'


def _normalise_text(text: str | int | float) -> str:
    if isinstance(text, bool):
        raise QuantityError(f"{text!r} is not a quantity")
    if isinstance(text, int):
        return str(text)
    if isinstance(text, float):
        if not math.isfinite(text):
            raise QuantityError(f"{text!r} is not a quantity")
        return repr(text)
    return text.strip()


def parse(text: str) -> Decimal:
    """Parse a quantity's text to its exact value.

    >>> parse("500m"), parse("256Mi"), parse("1e3")
    (Decimal('0.500'), Decimal('268435456'), Decimal('1E+3'))
    """
    match = _RE.match(text)
    if match is None:
        raise QuantityError(
            f'"{text}" is not a quantity; use a number with an optional suffix, '
            'e.g. "500m", "0.5", "128Mi", "1Gi" (binary: Ki Mi Gi Ti Pi Ei; '
            "decimal: n u m k M G T P E)"
        )
    try:
        number = Decimal(match["number"])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise QuantityError(f'"{text}" is not a quantity') from e
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number.scaleb(int(suffix[1:]))
