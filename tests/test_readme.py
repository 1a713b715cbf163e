"""Every code block of README.md is run or checked here: Python blocks run (short-trained models in a
temporary cache), every `sinai ...` line parses against the real command line (names, options and
values checked by the same callbacks a run uses), cheap ones run, and `make` targets exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import SHORT_RECIPES, use_recipes

from sinai.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def commands(language: str) -> list[list[str]]:
    """The shell commands of the README's ``language`` blocks, comments dropped."""
    lines = []
    for lang, body in BLOCKS:
        if lang == language:
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    lines.append(shlex.split(line))
    return lines


def remaining(ctx: click.Context) -> list[str]:
    """A group's unparsed tokens (the subcommand and its arguments)."""
    return [*getattr(ctx, "_protected_args", []), *ctx.args]


def parse(args: list[str]) -> click.Context:
    """Resolve ``args`` down to the leaf command and parse its options without running it."""
    ctx = cli.make_context("sinai", list(args), resilient_parsing=False)
    command: click.Command = cli
    rest = remaining(ctx)
    while isinstance(command, click.Group) and rest:
        group_ctx = ctx
        name, command, rest = command.resolve_command(group_ctx, rest)
        ctx = command.make_context(name, rest, parent=group_ctx)
        rest = remaining(ctx) if isinstance(command, click.Group) else []
    return ctx


def test_readme_is_for_users() -> None:
    assert len(README.encode()) <= 12_000
    assert "../shared" not in README and "## References" in README
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SINAI_CACHE_DIR", str(tmp_path / "cache"))
    use_recipes(monkeypatch, SHORT_RECIPES)
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    assert blocks
    for body in blocks:
        exec(compile(body, "README.md", "exec"), {"__name__": "readme"})


def test_readme_plans_parse() -> None:
    from sinai.sweep import parse_plan

    plans = [body for lang, body in BLOCKS if lang == "toml"]
    assert plans
    for body in plans:
        plan = parse_plan(body, source="README.md", name="readme")
        assert plan.size > 0 and plan.validation


def test_readme_shell_commands_parse() -> None:
    lines = commands("bash")
    sinai_lines = [line[1:] for line in lines if line[0] == "sinai"]
    assert len(sinai_lines) >= 10
    for args in sinai_lines:
        ctx = parse(args)
        assert ctx.command.callback is not None, args
    makefile = (ROOT / "Makefile").read_text()
    for line in lines:
        if line[0] == "make":
            assert re.search(rf"^{line[1]}:", makefile, flags=re.M), line


@pytest.mark.parametrize("args", [["sites", "--model", "mnist-vit"], ["demo", "--quick", "--plan"]])
def test_readme_cheap_commands_run(args, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SINAI_CACHE_DIR", str(tmp_path / "cache"))
    assert ["sinai", *args] in [line[: len(args) + 1] for line in commands("bash")] or args[-1] == "--plan"
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
