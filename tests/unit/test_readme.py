"""The README's configuration reference is the one the settings code generates."""

from __future__ import annotations

from pathlib import Path

from pipeline.settings import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Configuration reference", 1)[1]
    assert reference_markdown() in section, "regenerate it: plantwatch config --reference"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
