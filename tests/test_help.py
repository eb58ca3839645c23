"""Every help page reads like a man page: no `<bool>`, one metavar style, examples at the end."""

from __future__ import annotations

import re

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from derive.cli import app
from derive.commands.jobs import AttributionModel


def command_paths(group: TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group below ``group``, as argument tuples."""
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, TyperGroup):
            paths += command_paths(command, (*prefix, name))
    return paths


def command_at(path: tuple[str, ...]) -> object:
    command: object = ROOT
    for name in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    return command


ROOT = typer.main.get_command(app)
assert isinstance(ROOT, TyperGroup)
PATHS = [(), *command_paths(ROOT)]
LEAVES = [p for p in PATHS if p and not isinstance(command_at(p), TyperGroup)]


def help_text(path: tuple[str, ...], columns: int) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], env={"COLUMNS": str(columns), "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "derive")
def test_help_shows_no_type_placeholders(path: tuple[str, ...], columns: int) -> None:
    text = help_text(path, columns)

    assert re.findall(r"<\w+>", text) == []
    assert "{" not in text.splitlines()[1]  # the usage line: FILE, not {FILE}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "derive")
def test_help_ends_with_one_to_three_examples(path: tuple[str, ...]) -> None:
    lines = [line.strip() for line in help_text(path, 100).splitlines() if line.strip()]

    start = lines.index("Examples")
    examples = lines[start + 1 :]
    assert 1 <= len(examples) <= 3
    assert all(line.startswith(("derive ", "cat ")) for line in examples)


@pytest.mark.parametrize("columns", [80, 100])
def test_the_model_choices_are_never_broken_mid_word(columns: int) -> None:
    words = set(re.findall(r"[\w-]+", help_text(("attribution",), columns)))

    assert {model.value for model in AttributionModel} <= words


def test_backfill_help_gives_the_date_format() -> None:
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", help_text(("backfill",), 100)).split())

    assert "--from DATE" in text
    assert "ISO-8601, e.g. 2026-11-22T08:00:00Z or 2026-11-22" in text


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_options_that_take_a_value_show_an_upper_case_metavar(path: tuple[str, ...]) -> None:
    for param in getattr(command_at(path), "params", []):
        if isinstance(param, TyperOption) and not param.is_flag:
            assert param.metavar, param.name
            assert param.metavar == param.metavar.upper(), param.name
