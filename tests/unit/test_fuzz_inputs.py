"""Properties over generated inputs: every spec, manifest, policy, index and bundle ends valid
or refused with the controller's own error, each within hypothesis' deadline.

Few examples here (the suite runs on loaded machines); ``bench/fuzz_inputs.py``
runs the same strategies 10,000 times per kind.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings

from controller.spec import safe_yaml
from tests import fuzzing

FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@FUZZ
@given(fuzzing.spec_texts)
def test_every_spec_text_is_valid_or_a_spec_error(text: str) -> None:
    assert fuzzing.run_spec(text) in {"valid", "refused"}


def test_every_spec_text_is_valid_or_a_spec_error_with_the_python_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(safe_yaml, "_Events", safe_yaml._PythonEvents)

    @FUZZ
    @given(fuzzing.spec_texts)
    def check(text: str) -> None:
        assert fuzzing.run_spec(text) in {"valid", "refused"}

    check()


@FUZZ
@given(fuzzing.spec_documents)
def test_every_spec_document_is_valid_or_a_spec_error(text: str) -> None:
    assert fuzzing.run_spec(text) in {"valid", "refused"}


@FUZZ
@given(fuzzing.manifest_texts)
def test_every_manifest_is_valid_or_refused(text: str) -> None:
    assert fuzzing.run_manifest(text) in {"valid", "refused"}


@FUZZ
@given(fuzzing.policy_texts)
def test_every_policy_file_is_valid_or_a_registry_error(text: str) -> None:
    assert fuzzing.run_policy(text) in {"valid", "refused"}


@FUZZ
@given(fuzzing.index_documents)
def test_every_index_is_valid_or_a_registry_error(data: bytes) -> None:
    assert fuzzing.run_index(data) in {"valid", "refused"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> fuzzing.BundleFixture:
    return fuzzing.BundleFixture.create(tmp_path_factory.mktemp("fuzz"))


def test_every_bundle_is_valid_or_refused(fixture: fuzzing.BundleFixture) -> None:
    outcomes: set[str] = set()

    @FUZZ
    @given(fuzzing.bundle_bytes(fixture))
    def check(data: bytes) -> None:
        outcomes.add(fuzzing.run_bundle(fixture, data))

    check()
    assert outcomes <= {"valid", "refused"}


def test_the_unchanged_inputs_are_valid(fixture: fuzzing.BundleFixture) -> None:
    """The strategies start from valid inputs: the properties are not vacuous."""
    assert fuzzing.run_spec(fuzzing.VALID_SPEC) == "valid"
    assert fuzzing.run_manifest(fuzzing.VALID_MANIFEST) == "valid"
    assert fuzzing.run_policy(fuzzing.VALID_POLICY) == "valid"
    assert fuzzing.run_bundle(fixture, fixture.valid()) == "valid"
