"""bhctl explain: one object's fields, from the models, the text of the docs' spec reference."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import main
from controller.spec import models, reference


def test_explain_lists_every_field_of_the_object_with_its_default_and_meaning() -> None:
    result = CliRunner().invoke(main.app, ["explain", "plugin.spec.hotSwap"])
    assert result.exit_code == 0, result.output
    for name, field in models.HotSwap.model_fields.items():
        assert f"  {field.alias or name}  <" in result.output
    assert "maxPauseMilliseconds  <integer, >= 1, <= 60000>  default: 200" in result.output
    assert "Longest time calls may be held at the flip" in result.output


def test_explain_and_the_docs_reference_say_the_same() -> None:
    page = reference.spec_reference()
    text = reference.explain("plugin.spec.restart")
    for name, field in models.Restart.model_fields.items():
        assert f"`{field.alias or name}`" in page
        assert f"  {field.alias or name}  <" in text


def test_an_unknown_path_names_what_there_is() -> None:
    result = CliRunner().invoke(main.app, ["explain", "plugin.spec.nope"])
    assert result.exit_code == 1
    assert "its object fields: " in result.output
    assert "hotSwap" in result.output
