"""``catprune frontier``: the grid read by the config's field types, the margin over the fewer-steps curve,
the Pareto frontier, and the command's outputs, resuming and errors on a tiny model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from catprune.cli import main
from catprune.evaluation import summarize
from catprune.frontier import (
    answer,
    frontier_markdown,
    frontier_points,
    frontier_rows,
    margin_over_curve,
    pareto_front,
    write_csv,
)
from catprune.grid import FrontierSettings, parse_grid, parse_value
from catprune.shapes.training import TrainConfig, build_pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


# --- pure functions ------------------------------------------------------------------------------------


def test_margin_is_read_off_the_curve_at_equal_macs() -> None:
    curve = [(4.0, 30.0), (1.0, 10.0), (2.0, 20.0), (8.0, float("inf"))]  # any order; inf left out
    assert margin_over_curve(curve, 3.0, 27.0) == pytest.approx(2.0)  # curve at 3: 25 dB
    assert margin_over_curve(curve, 1.5, 12.0) == pytest.approx(-3.0)  # curve at 1.5: 15 dB
    assert margin_over_curve(curve, 2.0, 20.0) == pytest.approx(0.0)  # on a point of the curve
    assert margin_over_curve(curve, 0.5, 50.0) is None  # below the curve's MACs: never extrapolated
    assert margin_over_curve(curve, 6.0, 50.0) is None  # beyond its last finite point
    assert margin_over_curve([], 1.0, 1.0) is None


def test_pareto_front() -> None:
    points = [(1.0, 10.0), (2.0, 20.0), (2.0, 15.0), (3.0, 18.0), (4.0, 25.0), (4.0, 25.0)]
    assert pareto_front(points) == [True, True, False, False, True, True]  # ties both stay


def test_rows_and_the_answer_on_constructed_figures() -> None:
    settings = FrontierSettings("m", "shapes", reference_steps=8)
    points, _ = frontier_points(settings, [4, 6], [8], parse_grid(["keep_ratio=0.3,0.5", "start_step=2"]))
    figures = {  # name: (MACs, seconds per image, PSNR); the curve: 20 dB at 4 MACs, 30 dB at 6
        "full": (8.0, 8.0, None),
        "steps=4": (4.0, 4.0, 20.0),
        "steps=6": (6.0, 6.0, 30.0),
        "cat,steps=8,keep_ratio=0.3,start_step=2": (5.0, 7.0, 27.0),  # curve at 5 MACs: 25 dB
        "cat,steps=8,keep_ratio=0.5,start_step=2": (7.0, 7.5, 40.0),  # beyond the curve
    }
    summary = [
        {"method": name, "macs": macs, "throughput": 1 / seconds, "psnr": psnr}
        for name, (macs, seconds, psnr) in figures.items()
    ]
    rows = frontier_rows(summary, points)
    assert [row["margin_db"] for row in rows] == [None, None, None, pytest.approx(2.0), None]
    assert [row["number"] for row in rows] == [None, None, None, 1, 2]
    assert [row["macs_ratio"] for row in rows] == [1.0, 0.5, 0.75, 0.625, 0.875]
    assert [row["pareto_macs"] for row in rows] == [False, True, True, True, True]
    assert [row["pareto_time"] for row in rows] == [False, True, True, False, True]
    assert answer(rows) == (
        "1 of the 1 pruned settings within the curve's MACs (1 more lie outside it) lie above the "
        "fewer-steps curve at equal MACs; the best, #1 `cat,steps=8,keep_ratio=0.3,start_step=2`, by 2.00 dB "
        "(at 0.62x the reference's MACs: PSNR 27.00 dB against 25.00 dB for fewer steps)."
    )
    rows[3]["margin_db"] = -1.5
    assert answer(rows).startswith("None of the 1 pruned settings within the curve's MACs (1 more lie")
    assert "the closest, #1 `cat,steps=8,keep_ratio=0.3,start_step=2`, lies 1.50 dB below it" in answer(rows)


def test_textured_alignment_in_the_table_and_csv(tmp_path: Path) -> None:
    """Textured captions' scores have no background: the alignment columns read the rest, with a note."""
    settings = FrontierSettings("textures-mmdit", "textures", reference_steps=8)
    points, _ = frontier_points(settings, [4], [8], parse_grid(["keep_ratio=0.3", "start_step=2"]))
    textured = {key: 1.0 for key in ("full", "count", "colour", "shape", "size", "position")}
    figures = {
        "full": (8, None, 1.0),
        "steps=4": (4, 20.0, 0.0),
        "cat,steps=8,keep_ratio=0.3,start_step=2": (5, 25.0, 1.0),
    }
    records = [
        {"method": name, "index": index, "steps": 8, "macs": macs, "seconds": 1.0,
         **({"psnr": psnr, "ssim": 0.5} if psnr is not None else {}),
         "alignment": {**textured, "full": full if index == 0 else 1.0}}
        for name, (macs, psnr, full) in figures.items()
        for index in range(2)
    ]  # fmt: skip
    rows = frontier_rows(summarize(records, list(figures)), points)
    assert [row["alignment_full"] for row in rows] == [100.0, 50.0, 100.0]
    assert all(row["alignment_background"] is None for row in rows)
    table = frontier_markdown(rows, settings, 2)
    assert "Alignment (%)" in table and "the background is not scored" in table
    write_csv(rows, tmp_path / "frontier.csv")
    with (tmp_path / "frontier.csv").open() as file:
        assert [row["alignment_full"] for row in csv.DictReader(file)] == ["100.0", "50.0", "100.0"]


def test_values_are_read_by_the_field_type() -> None:
    assert parse_value("0.5", float) == 0.5 and parse_value("4", int) == 4 and parse_value("x", str) == "x"
    assert parse_value("True", bool) is True and parse_value("false", bool) is False
    assert parse_value("linear", Literal["none", "linear"]) == "linear"
    assert parse_value("-1", tuple[int, ...]) == (-1,)
    assert parse_value("[4,-1]", tuple[int, ...]) == (4, -1) and parse_value("[]", tuple[int, ...]) == ()
    assert parse_value("none", int | None) is None and parse_value("3", int | None) == 3


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("0.5", int, "'0.5' is not of type int"),
        ("yes", bool, "'yes' is not true or false"),
        ("cubic", Literal["none", "linear"], "'cubic' is not one of none, linear"),
        ("[4,a]", tuple[int, ...], "'a' is not of type int"),
        ("[4]", tuple[int, int], r"'\[4\]' is not a tuple of 2"),
    ],
)
def test_values_of_the_wrong_type(text: str, kind: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_value(text, kind)


def test_the_grid_in_the_config_s_field_order_and_its_names() -> None:
    grid = parse_grid(["start_step=4,6", "keep_ratio=0.30,.5,0.3", "strategy=cat,rows"])
    assert grid == {"keep_ratio": [0.3, 0.5], "start_step": [4, 6], "strategy": ["cat", "rows"]}
    points, left_out = frontier_points(FrontierSettings("m", "shapes", 8, seed=3), [4, 6, 8], [8, 6], grid)
    names = [point.variant.name for point in points]
    assert names[:3] == ["full", "steps=4", "steps=6"]  # the reference steps are the reference
    assert names[3] == "cat,steps=8,keep_ratio=0.3,start_step=4,strategy=cat"
    assert len(names) == 3 + 8 + 4 and len(left_out) == 4  # start_step 6 at 6 steps would not prune
    assert all(point.variant.config.seed == 3 for point in points[3:])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "kv_extrapolatoin=linear",
            r"CATPruningConfig has no field 'kv_extrapolatoin'; its fields: keep_ratio",
        ),
        ("keep_ratio=0.3,high", r"'high' is not of type float"),
        ("steps=20", r"--steps"),
        ("keep_ratio", r"expected FIELD=VALUE"),
    ],
)
def test_bad_grid_specifications(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grid([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["keep_ratio=0.3", "keep_ratio=0.5"])
    with pytest.raises(ValueError, match=r"cat,steps=8,keep_ratio=1.5: CATPruningConfig: keep_ratio"):
        frontier_points(FrontierSettings("m", "shapes", 8), [4], [8], parse_grid(["keep_ratio=1.5"]))


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight shapes pipeline (32x32 pixels, 16x16 tokens) saved locally."""
    path = tmp_path_factory.mktemp("models") / "tiny-mmdit"
    build_pipeline(TrainConfig(arch="mmdit", width=32, layers=2, text_layers=1, steps=1)).save_pretrained(
        path
    )
    return str(path)


def frontier_args(
    model: str, out: Path, grid: tuple[str, ...] = ("keep_ratio=0.3,0.6", "start_step=3")
) -> list[str]:
    """2 prompts, reference 8 steps, a curve of 2 step counts, a 2-point grid."""
    return [
        "frontier", "--model", model, "--prompts", "shapes", "--num-prompts", "2", "--reference-steps", "8",
        "--curve-steps", "4,6", *(f"--grid={spec}" for spec in grid), "--out", str(out), "--no-progress",
    ]  # fmt: skip


def test_the_command_writes_the_table_and_plot_and_resumes_without_generating(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "catprune", *frontier_args(tiny_model, out)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "**Answer:**" in result.stdout and "frontier.png" in result.stdout

    with (out / "frontier.csv").open() as file:
        rows = list(csv.DictReader(file))
    names = ["full", "steps=4", "steps=6", "cat,steps=8,keep_ratio=0.3,start_step=3"]
    assert [row["name"] for row in rows] == [*names, "cat,steps=8,keep_ratio=0.6,start_step=3"]
    assert [row["kind"] for row in rows] == ["full", "fewer-steps", "fewer-steps", "cat", "cat"]
    assert [row["keep_ratio"] for row in rows] == ["", "", "", "0.3", "0.6"]
    assert float(rows[1]["macs_ratio"]) == pytest.approx(4 / 8) and rows[0]["psnr"] == ""  # the reference
    assert all(row["images"] == "2" and -1 <= float(row["ssim"]) <= 1 for row in rows[1:])
    assert all(float(row["alignment_full"]) >= 0 for row in rows)
    curve = [(float(row["macs"]), float(row["psnr"])) for row in rows[1:3]]
    for row in rows[3:]:  # the margin is that of the curve at the row's MACs, where it has one
        margin = margin_over_curve(curve, float(row["macs"]), float(row["psnr"]))
        assert row["margin_db"] == "" if margin is None else float(row["margin_db"]) == pytest.approx(margin)
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "frontier.md").read_text()
    assert (
        "| # | Method | Setting | Steps | MACs | MACs (x ref.) |" in table and "dB over fewer steps" in table
    )
    assert "| 1 | cat on euler | keep_ratio=0.3 start_step=3 | 8 |" in table
    assert len(list(out.glob("items/*/*.json"))) == 5 * 2

    def must_not_generate(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed run generates nothing that is on disk")

    stamps = {path: path.stat().st_mtime_ns for path in out.glob("items/*/*.json")}
    monkeypatch.setattr("catprune.evaluation.run_generation", must_not_generate)
    # The grid options in another order and spelling: the same settings, all done.
    assert main(frontier_args(tiny_model, out, ("start_step=3", "keep_ratio=.6,0.30"))) == 0
    assert stamps == {path: path.stat().st_mtime_ns for path in out.glob("items/*/*.json")}
    assert json.loads((out / "run.json").read_text())["settings"]["reference_steps"] == 8
    assert "**Answer:**" in capsys.readouterr().out


def test_an_unknown_grid_field_is_a_clear_error_before_any_work(
    tiny_model: str, tmp_path: Path, capsys: Any
) -> None:
    grid = ("keep_ratio=0.3", "refresh_step=-1")
    assert main(frontier_args(tiny_model, tmp_path / "run", grid)) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        "catprune frontier: error: --grid 'refresh_step=-1': CATPruningConfig has no field"
    )
    assert "its fields: keep_ratio, start_step" in error and not (tmp_path / "run").exists()


def test_a_call_that_adds_settings_tables_every_setting_in_the_folder(
    tiny_model: str, tmp_path: Path
) -> None:
    """Settings added by a later call with another grid (and the options beyond the paper) join the ones
    already there: the table and plot describe the whole folder."""
    out = tmp_path / "run"
    assert main(frontier_args(tiny_model, out, ("keep_ratio=0.3", "start_step=3"))) == 0
    added = ("keep_ratio=0.3", "start_step=3", "kv_extrapolation=linear", "refresh_steps=-1")
    assert main(frontier_args(tiny_model, out, added)) == 0
    with (out / "frontier.csv").open() as file:
        names = [row["name"] for row in csv.DictReader(file)]
    assert names == [
        "full",
        "steps=4",
        "steps=6",
        "cat,steps=8,keep_ratio=0.3,start_step=3,kv_extrapolation=linear,refresh_steps=[-1]",
        "cat,steps=8,keep_ratio=0.3,start_step=3",
    ]
