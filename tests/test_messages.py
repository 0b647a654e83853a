"""Each of the command line's common mistakes gets one line that names the fix (issue 27, item 4)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from catprune.cli import main
from catprune.errors import UserError
from catprune.formatting import plural
from catprune.names import SHIPPED_MODELS, check_model_name, hub_unreachable, is_hub_id

PROMPT = "a large red circle in the center on a white background"


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command line; it must fail with exit status 2 and one line on stderr."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    return error


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_negative_steps_say_steps_must_be_positive(steps, capsys, tmp_path) -> None:
    error = error_line(capsys, ["generate", PROMPT, "--steps", steps, "--out", str(tmp_path / "x.png")])
    assert (
        error
        == f"catprune generate: error: --steps must be a positive number of denoising steps, got {steps}"
    )
    error = error_line(capsys, ["macs", "--model", "sd3-medium", "--steps", steps])
    assert "--steps must be a positive number of denoising steps" in error


def test_too_few_steps_name_both_fixes(capsys, tmp_path) -> None:
    error = error_line(capsys, ["generate", PROMPT, "--steps", "6", "--out", str(tmp_path / "x.png")])
    assert "--steps (6) must be larger than --start-step (8)" in error
    assert "give more steps or a smaller --start-step" in error


def test_an_unknown_model_name_lists_the_shipped_ones_without_a_network_attempt(
    capsys, tmp_path, monkeypatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a network attempt")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    error = error_line(
        capsys, ["generate", PROMPT, "--model", "shapes-foo", "--out", str(tmp_path / "x.png")]
    )
    assert "unknown model 'shapes-foo': not a shipped model (" + ", ".join(SHIPPED_MODELS) + ")" in error
    assert "not a folder, and not a hub id (org/name); did you mean shapes-mmdit?" in error


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("shapes-mmdit", True),
        ("stabilityai/stable-diffusion-3-medium-diffusers", True),
        ("org/name.v2", True),
        ("shapes-foo", False),
        ("a/b/c", False),
        ("./missing", False),
        ("org/", False),
        ("my model", False),
    ],
)
def test_model_names_are_checked_without_loading_anything(name: str, valid: bool, tmp_path: Path) -> None:
    if valid:
        check_model_name(name)
    else:
        with pytest.raises(UserError, match="shapes-mmdit, shapes-pixart, textures-mmdit"):
            check_model_name(name)
    check_model_name(tmp_path)  # an existing folder is left to the loader
    assert is_hub_id("org/name") and not is_hub_id("org/../name")


def test_a_missing_folder_says_no_such_folder(capsys, tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    error = error_line(
        capsys, ["generate", PROMPT, "--model", str(missing), "--out", str(tmp_path / "x.png")]
    )
    assert f"model '{missing}': no such folder" in error


@pytest.mark.parametrize(
    "cause",
    [
        ConnectionRefusedError(111, "Connection refused"),
        socket.gaierror(-2, "Name or service not known"),
        TimeoutError("timed out"),
        type("ConnectError", (Exception,), {})("[Errno 101] Network is unreachable"),  # httpx's, by name
    ],
)
def test_an_unreachable_hub_is_named_as_such(cause: Exception, monkeypatch, capsys, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    def fail(*args, **kwargs):
        try:
            raise cause
        except Exception as error:
            raise OSError("Cannot load model org/name: the model is not fully cached locally") from error

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    error = error_line(capsys, ["generate", "x", "--model", "org/name", "--out", str(tmp_path / "x.png")])
    assert "cannot load model 'org/name': the Hugging Face hub could not be reached (" in error
    assert "not in the local cache; connect to the network" in error


def test_a_hub_that_answers_is_not_called_unreachable() -> None:
    try:
        raise OSError("org/name is not a valid model identifier listed on 'https://huggingface.co/models'")
    except OSError as error:
        assert hub_unreachable(error) is None


@pytest.mark.slow
def test_an_unreachable_hub_for_real(tmp_path: Path) -> None:
    """A hub endpoint where nothing listens (no outside network needed): the same one line."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "catprune", "generate", "x", "--model", "org/name", "--out", "x.png"],
        capture_output=True, text=True, env=env, timeout=600, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("catprune generate: error:")]
    assert len(lines) == 1 and "the Hugging Face hub could not be reached" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("out", "why"),
    [
        ("/proc/x.png", "the folder /proc does not accept new files; choose a folder you can write"),
        ("{file}/x.png", "{file} is a file, not a folder; choose another path"),
    ],
)
def test_an_output_that_cannot_be_written_says_why(out, why, capsys, tmp_path) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    out, why = out.format(file=file), why.format(file=file)
    if out.startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    error = error_line(capsys, ["generate", PROMPT, "--out", out])
    assert error == f"catprune generate: error: cannot write --out {out}: {why}"


def test_macs_warns_when_no_step_is_pruned() -> None:
    from catprune.tools.macs import never_pruned_warning

    schnell = SimpleNamespace(architecture=SimpleNamespace(name="flux-schnell"), steps=4, start_step=8)
    assert never_pruned_warning(schnell) == (
        "no step is pruned: flux-schnell's 4 steps end before --start-step 8, so CAT / full is 1.000; "
        "give --start-step 2 to 3 or more --steps"
    )
    assert (
        never_pruned_warning(SimpleNamespace(architecture=schnell.architecture, steps=28, start_step=8)) == ""
    )


def test_plurals() -> None:
    assert [plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert plural(1, "row") == "1 row" and plural(3, "query", "queries") == "3 queries"


def test_textures_mmdit_says_what_it_is_and_is_not(capsys, tmp_path, monkeypatch) -> None:
    """At the point of use: one line before it generates, and in ``generate --help`` with its grammar."""
    import catprune.runtime

    def stop(*args, **kwargs):
        raise UserError("stopped before loading")

    monkeypatch.setattr(catprune.runtime, "load_pipeline", stop)
    prompt = "a large red circle at the top left on a gray striped background"
    out = str(tmp_path / "x.png")
    assert main(["generate", prompt, "--model", "textures-mmdit", "--out", out]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: textures-mmdit is a test bed for sampling paths")
    assert "not a drawing model" in lines[0] and "1.6% of held-out captions fully right" in lines[0]
    assert main(["generate", PROMPT, "--out", out]) == 2  # shapes-mmdit: no note
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Note: textures-mmdit is a test bed for sampling paths" in help_text
    assert help_text.index("Prompts of textures-mmdit") < help_text.index("not a drawing model")


def test_the_write_check_leaves_nothing_behind(tmp_path: Path) -> None:
    from catprune.tools.arguments import check_writable

    check_writable(tmp_path / "a" / "b" / "x.png")
    check_writable(tmp_path / "c" / "d", folder=True)
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"png")
    check_writable(existing)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.png"]
    assert existing.read_bytes() == b"png"
