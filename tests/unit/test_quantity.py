from decimal import Decimal

import pytest

from controller.spec.quantity import Quantity, QuantityError, parse


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("0.5", Decimal("0.5")),
        ("1", Decimal(1)),
        ("2", Decimal(2)),
        ("128Mi", Decimal(128 * 2**20)),
        ("1Gi", Decimal(2**30)),
        ("1.5Ki", Decimal(1536)),
        ("500M", Decimal(500_000_000)),
        ("1k", Decimal(1000)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        ("250u", Decimal("0.00025")),
        ("-1", Decimal(-1)),
        (".5", Decimal("0.5")),
        ("+3", Decimal(3)),
    ],
)
def test_parses_kubernetes_quantities(text, value):
    assert parse(text) == value


@pytest.mark.parametrize("text", ["12XB", "", "Mi", "1 Mi", "1mi", "1.2.3", "0x10", "1Gib", "e3"])
def test_refuses_what_kubernetes_refuses(text):
    with pytest.raises(QuantityError, match="is not a quantity"):
        parse(text)


def test_rounds_up_to_whole_units():
    assert Quantity("1.5").as_int() == 2
    assert Quantity("100m").as_millis() == 100
    assert Quantity("0.0001").as_millis() == 1
    assert Quantity(2).as_millis() == 2000
    assert Quantity(0.25).as_millis() == 250


def test_keeps_the_text_and_compares_by_value():
    q = Quantity("1024Mi")
    assert str(q) == "1024Mi"
    assert q == Quantity("1Gi")
    assert q != Quantity("1G")
