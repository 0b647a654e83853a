"""The command line starts without importing torch or diffusers: only the subcommand that argv names is
imported, and ``catprune --help`` lists every subcommand from ``catprune.cli.COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from catprune import cli

HEAVY = ("torch", "diffusers")
LIST_HEAVY = f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a fresh interpreter (wide enough that argparse does not wrap help lines)."""
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False, env=env
    )


def test_importing_the_cli_imports_neither_torch_nor_diffusers() -> None:
    result = run_python(f"import catprune.cli, sys; {LIST_HEAVY}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_the_package_is_lazy_but_exports_work() -> None:
    result = run_python(
        "import catprune, sys\n"
        f"{LIST_HEAVY}\n"
        "assert set(catprune.__all__) <= set(dir(catprune))\n"
        "from catprune import apply_cat_pruning, CATPruningConfig\n"
        "assert apply_cat_pruning.__module__ == 'catprune.integration'\n"
        "assert CATPruningConfig is catprune.CATPruningConfig\n"
        "print(catprune.__version__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", catprune_version()]


def catprune_version() -> str:
    import catprune

    return catprune.__version__


def test_unknown_package_attribute_raises_attribute_error() -> None:
    import catprune

    with pytest.raises(AttributeError, match="no_such_name"):
        catprune.no_such_name  # noqa: B018


def test_help_lists_every_subcommand_without_importing_torch() -> None:
    result = run_python(
        "import sys\n"
        "from catprune.cli import TOOL_MODULES as COMMAND_MODULES, main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code)\n"
        f"{LIST_HEAVY}\n"
    )
    assert result.returncode == 0, result.stderr
    *help_lines, exit_line, heavy_line = result.stdout.splitlines()
    assert (exit_line, heavy_line) == ("exit 0", "[]")
    listed = " ".join(" ".join(help_lines).split())  # a long name's summary starts on the next line
    for name, (_, summary, _) in cli.COMMANDS.items():
        assert f" {name} {summary} " in listed


def test_help_as_a_console_script_and_with_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "catprune", "--help"], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in cli.COMMANDS)


def test_a_subcommand_help_shows_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["generate", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: catprune generate" in out
    assert "--compare" in out and "--keep-ratio" in out


def test_only_the_named_tool_module_is_imported() -> None:
    result = run_python(
        "import sys\n"
        "from catprune.cli import TOOL_MODULES as COMMAND_MODULES, main\n"
        "try:\n"
        "    main(['macs', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m in COMMAND_MODULES), file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "['catprune.tools.macs']"


@pytest.mark.parametrize(("argv", "message"), [(["nope"], "invalid choice: 'nope'"), ([], "required")])
def test_an_unknown_or_missing_command_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: catprune" in err and message in err


def test_user_errors_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(cli.COMMANDS["macs"][0])

    def fail(args: argparse.Namespace) -> int:
        raise ValueError("bad value")

    monkeypatch.setattr(module, "run", fail)
    assert cli.main(["macs", "--model", "anything"]) == 2
    assert "catprune macs: error: bad value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        ([], None),
        (["--help"], None),
        (["-h", "generate", "--help"], "generate"),
        (["--", "eval"], "eval"),
        (["--"], None),
    ],
)
def test_command_name(argv: list[str], command: str | None) -> None:
    assert cli.command_name(argv) == command


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_the_table_matches_what_each_tool_registers(name: str) -> None:
    """``catprune --help`` lists the table's summaries: they are the ones the tool module registers."""
    module, summary, _ = cli.COMMANDS[name]
    subparsers = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(subparsers)
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == {name: summary}


def test_the_table_covers_every_tool_module() -> None:
    from pathlib import Path

    import catprune.tools

    folder = Path(catprune.tools.__file__).parent
    found = {f"catprune.tools.{path.stem}" for path in folder.glob("[!_]*.py") if path.stem != "arguments"}
    assert set(cli.TOOL_MODULES) == found


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "catprune", "--version"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"catprune {catprune_version()}"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_a_subcommand_help_imports_no_torch(name: str) -> None:
    """Help is text: printing it must not pay for torch (seconds; the help itself takes well under one)."""
    result = run_python(
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from catprune.cli import main\n"
        "try:\n"
        f"    main([{name!r}, '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"{LIST_HEAVY}\n"
        "print(f'{time.perf_counter() - start:.2f} s', file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: catprune {name}" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]", f"{name} --help imported {result.stdout.splitlines()[-1]}"


def test_generate_help_as_a_console_script_imports_no_torch() -> None:
    """The real entry point, ``python -m catprune generate --help``, with a tracer on the import of torch."""
    code = (
        "import sys, runpy\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers'):\n"
        "            raise ImportError(f'{name} imported to print help')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = ['catprune', 'generate', '--help']\n"
        "runpy.run_module('catprune', run_name='__main__')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "usage: catprune generate" in result.stdout and "--threads" in result.stdout


def test_the_light_name_lists_match_the_registries() -> None:
    """``catprune.names`` lists names that heavy modules register, so that help needs no torch: they agree."""
    from pathlib import Path

    import catprune.names as names
    from catprune.adapters.sd3 import SD3Adapter
    from catprune.architectures import ARCHITECTURES
    from catprune.evaluation import method_names
    from catprune.runtime import DTYPES
    from catprune.strategies import STRATEGIES
    from catprune.tools import demo

    assert tuple(ARCHITECTURES) == names.ARCHITECTURE_NAMES
    assert tuple(STRATEGIES) == names.STRATEGY_NAMES
    assert tuple(method_names()) == names.METHOD_ORDER
    assert tuple(DTYPES) == names.DTYPE_NAMES
    assert demo.STEPS == SD3Adapter.default_steps == demo.MODEL.default_steps
    shipped = Path(cli.__file__).parent / "models"
    assert set(names.SHIPPED_MODELS) == {path.name for path in shipped.iterdir() if path.is_dir()}
