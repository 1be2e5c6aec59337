import pytest

from controller.spec.semver import Version, VersionError, VersionRange


def test_orders_by_semver_precedence():
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.10.0",
        "2.0.0",
    ]
    versions = [Version.parse(v) for v in ordered]
    assert sorted(reversed(versions)) == versions
    assert Version.parse("1.0.0+build.5") == Version.parse("1.0.0")
    assert str(Version.parse("2.0.0-rc.1+sha.5")) == "2.0.0-rc.1+sha.5"


@pytest.mark.parametrize("text", ["1.0", "01.2.3", "1.2.3.4", "v1.2.3", "1.2.3-", "", "latest"])
def test_refuses_what_is_not_semver(text):
    with pytest.raises(VersionError, match=r"MAJOR\.MINOR\.PATCH"):
        Version.parse(text)


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        (">=1.0,<2", ["1.0.0", "1.9.9"], ["0.9.9", "2.0.0", "2.0.0-rc.1"]),
        (">=1.0 <2", ["1.5.0"], ["2.1.0"]),
        (">= 1.0, < 2", ["1.5.0"], ["2.1.0"]),
        ("^1.2", ["1.2.0", "1.9.0"], ["1.1.9", "2.0.0"]),
        ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
        ("^0.0.3", ["0.0.3"], ["0.0.4"]),
        ("~1.2.3", ["1.2.3", "1.2.9"], ["1.3.0", "1.2.2"]),
        ("~1", ["1.0.0", "1.9.9"], ["2.0.0"]),
        ("1.x", ["1.0.0", "1.99.0"], ["2.0.0", "0.9.0"]),
        ("1.2.*", ["1.2.0", "1.2.7"], ["1.3.0"]),
        ("*", ["0.0.1", "9.9.9"], ["1.0.0-rc.1"]),
        ("1.2.3", ["1.2.3"], ["1.2.4"]),
        ("==1.2.3", ["1.2.3"], ["1.2.2"]),
        (">1.2", ["1.3.0"], ["1.2.9"]),
        ("<=1.2", ["1.2.9"], ["1.3.0"]),
        (">=1.0.0,!=1.3.0", ["1.2.0", "1.4.0"], ["1.3.0"]),
        ("<1 || >=3", ["0.5.0", "3.1.0"], ["2.0.0"]),
        (">=2.0.0-rc.1,<3", ["2.0.0-rc.2", "2.1.0"], ["2.1.0-beta"]),
    ],
)
def test_ranges(spec, inside, outside):
    r = VersionRange.parse(spec)
    for v in inside:
        assert r.matches(Version.parse(v)), f"{v} should be in {spec}"
    for v in outside:
        assert not r.matches(Version.parse(v)), f"{v} should not be in {spec}"


@pytest.mark.parametrize("text", [">>1", "", "  ", "1.x.3", "^", ">=1.0,", "a.b.c", "!=1.x", "<*"])
def test_refuses_malformed_ranges(text):
    with pytest.raises(VersionError):
        VersionRange.parse(text)


def test_best_picks_the_highest_match():
    versions = [Version.parse(v) for v in ["1.0.0", "1.4.0", "2.0.0", "1.5.0-rc.1"]]
    assert VersionRange.parse("^1.0").best(versions) == Version.parse("1.4.0")
    assert VersionRange.parse("^3").best(versions) is None
