"""``catprune.peers``: other solvers and diffusers' caches as frontier rows, on the shipped toy models at a
few steps: each solver's calls and MACs, each cache's MACs counted from what ran, refusals reported with
their error, the sharpness metric, the plot and the command's options."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from catprune import peers
from catprune.adapters import adapter_for
from catprune.cli import main
from catprune.config import CATPruningConfig
from catprune.evaluation import Variant
from catprune.frontier import FrontierSettings, frontier_points, parse_grid, recorded_points, run_frontier
from catprune.runtime import load_pipeline, psnr, run_generation, use_cpu_threads

PROMPT = (
    "a large red circle at the top left and a small blue square at the bottom right on a white background"
)


@pytest.fixture(scope="module")
def mmdit() -> Any:
    pipe = load_pipeline("shapes-mmdit")
    use_cpu_threads(pipe.transformer)
    return pipe


@pytest.fixture(scope="module")
def pixart() -> Any:
    pipe = load_pipeline("shapes-pixart")
    use_cpu_threads(pipe.transformer)
    return pipe


def full_call_macs(pipe: Any) -> tuple[int, int]:
    """(MACs of one unpruned CFG call, of which the blocks') from the cost model."""
    adapter, transformer = adapter_for(pipe.transformer), pipe.transformer
    stats = run_generation(pipe, PROMPT, 1, 0, config=CATPruningConfig.unpruned()).stats
    assert stats is not None
    tokens, text = stats.image_tokens, stats.text_tokens
    blocks = sum(
        adapter.block_macs(block, tokens, tokens, text, False)
        for name in adapter.blocks
        for block in transformer.get_submodule(name)
    )
    return stats.macs, 2 * blocks  # two CFG rows


class CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self.count)

    def count(self, *args: Any) -> None:
        self.calls += 1


# --- solvers -------------------------------------------------------------------------------------------


def test_flow_model_gets_flow_solvers(mmdit: Any) -> None:
    base = mmdit.scheduler
    assert peers.is_flow_matching(base) and peers.native_solver(base) == "euler"
    unipc, dpm = peers.make_scheduler(base, "unipc"), peers.make_scheduler(base, "dpm++2m")
    for made in (unipc, dpm):
        assert made.config.use_flow_sigmas and made.config.prediction_type == "flow_prediction"
        assert made.config.flow_shift == peers.flow_shift(base) and made.config.solver_order == 2
    assert type(peers.make_scheduler(base, "heun")).__name__ == "FlowMatchHeunDiscreteScheduler"


def test_epsilon_model_gets_discrete_solvers_with_its_betas(pixart: Any) -> None:
    base = pixart.scheduler
    assert not peers.is_flow_matching(base) and peers.native_solver(base) == "dpm++2m"
    for solver in ("euler", "unipc", "heun"):
        made = peers.make_scheduler(base, solver)
        assert not made.config.get("use_flow_sigmas") and made.config.prediction_type == "epsilon"
        assert made.config.beta_schedule == base.config.beta_schedule
    with pytest.raises(ValueError, match="unknown solver 'rk4'; known: euler, unipc"):
        peers.make_scheduler(base, "rk4")


@pytest.mark.parametrize(("solver", "calls"), [("euler", 4), ("unipc", 4), ("dpm++2m", 4), ("heun", 7)])
def test_each_solver_counts_the_calls_it_makes(mmdit: Any, solver: str, calls: int) -> None:
    counter = CallCounter(mmdit.transformer)
    try:
        generation = peers.PeerRun(solver)(mmdit, PROMPT, 4, 0, config=CATPruningConfig.unpruned())
    finally:
        counter.handle.remove()
    assert counter.calls == calls  # Heun: two calls a step, one at the last
    per_call, _ = full_call_macs(mmdit)
    assert generation.stats is not None and generation.stats.macs == calls * per_call
    assert mmdit.scheduler.__class__.__name__ == "FlowMatchEulerDiscreteScheduler"  # restored


def test_solvers_converge_to_the_same_image(pixart: Any) -> None:
    """UniPC on the epsilon PixArt toy is not broken: at many steps it agrees with DPM-Solver++ (the
    pipeline's own); discrete Euler needs the input scaling the pipeline now applies."""
    dpm = peers.PeerRun("dpm++2m")(pixart, PROMPT, 40, 0).images[0]
    assert psnr(peers.PeerRun("unipc")(pixart, PROMPT, 40, 0).images[0], dpm) > 45
    assert psnr(peers.PeerRun("euler")(pixart, PROMPT, 40, 0).images[0], dpm) > 35


def test_cat_runs_on_another_solver(mmdit: Any) -> None:
    config = CATPruningConfig(keep_ratio=0.5, start_step=2)
    generation = peers.PeerRun("unipc")(mmdit, PROMPT, 6, 0, config=config)
    per_call, _ = full_call_macs(mmdit)
    assert generation.stats is not None and generation.stats.pruned_steps == 4
    assert 2 * per_call < generation.stats.macs < 6 * per_call


# --- MACs from what ran --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mmdit", "pixart"])
def test_meter_equals_the_cost_model_without_caches(model: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(model)
    engine = run_generation(pipe, PROMPT, 3, 0, config=CATPruningConfig.unpruned()).stats
    with peers.MacMeter(pipe.transformer) as meter:
        run_generation(pipe, PROMPT, 3, 0)
    assert engine is not None and meter.macs == engine.macs
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    assert not any(isinstance(p, peers._CountingProcessor) for p in processors)  # removed


def test_a_cache_that_skips_blocks_counts_only_what_ran(pixart: Any) -> None:
    """TaylorSeer on whole blocks (PixArt: all of them), interval 2, three warm-up steps: of 12 steps the
    blocks run at 0, 1, 2, 4, 6, 8, 10 (7), the embedders and output projection at every step."""
    per_call, blocks = full_call_macs(pixart)
    generation = peers.PeerRun(None, "taylorseer-blocks", 2)(pixart, PROMPT, 12, 0)
    assert generation.stats is not None
    assert generation.stats.macs == 12 * (per_call - blocks) + 7 * blocks
    assert generation.stats.macs / (12 * per_call) == pytest.approx(7 / 12, abs=0.05)


def test_whole_block_forecast_leaves_out_sd3s_last_block(mmdit: Any) -> None:
    names = peers.forecastable_blocks(mmdit.transformer)
    assert len(names) == len(mmdit.transformer.transformer_blocks) - 1
    generation = peers.PeerRun(None, "taylorseer-blocks", 2)(mmdit, PROMPT, 8, 0)
    per_call, _ = full_call_macs(mmdit)
    assert generation.stats is not None and generation.stats.macs < 8 * per_call


def test_attention_skipping_counts_the_attention_it_skipped(mmdit: Any) -> None:
    per_call, _ = full_call_macs(mmdit)
    generation = peers.PeerRun(None, "pab", 2)(mmdit, PROMPT, 6, 0)
    assert generation.stats is not None
    assert 0.5 * 6 * per_call < generation.stats.macs < 6 * per_call
    again = peers.PeerRun(None, "pab", 2)(mmdit, PROMPT, 6, 0)  # state reset between generations
    assert again.stats is not None and again.stats.macs == generation.stats.macs
    assert np.array_equal(again.images, generation.images)


def test_magcache_calibrates_then_skips(mmdit: Any) -> None:
    ratios = peers.calibrate_magcache(mmdit, PROMPT, 8, 0, None)
    assert len(ratios) == 8 and ratios[0] == 1.0
    per_call, _ = full_call_macs(mmdit)
    generation = peers.PeerRun(None, "magcache", 0.5, tuple(ratios))(mmdit, PROMPT, 8, 0)
    assert generation.stats is not None and generation.stats.macs < 8 * per_call


# --- refusals ------------------------------------------------------------------------------------------


def test_a_refused_cache_is_a_row_with_its_error(mmdit: Any, tmp_path: Path) -> None:
    points = peers.cache_points(["fbc", "pab"], 4, None)

    def run(variant: Variant, index: int) -> None:
        variant.generate(mmdit, PROMPT, variant.steps, 0)  # type: ignore[misc]

    kept, errors = peers.probe(points, run, tmp_path / "errors.json")
    assert {point.family for point in kept} == {"pab"}
    assert list(errors) == ["fbc"] and errors["fbc"].startswith("TypeError: unsupported operand")
    rows = peers.error_rows(errors)
    assert rows[0]["kind"] == peers.ERROR_KIND and rows[0]["error"] == errors["fbc"]
    assert "refused or failed on this model" in peers.refusal_notes(errors)[0]

    # A resumed run reports the error without trying again.
    def never_fbc(variant: Variant, index: int) -> None:
        assert not variant.name.startswith("fbc"), "tried again"

    kept_again, again = peers.probe(points, never_fbc, tmp_path / "errors.json")
    assert again == errors and len(kept_again) == len(kept)


def test_error_text_is_one_line() -> None:
    assert peers.error_text(ValueError("first\nsecond")) == "ValueError: first"


# --- names, quality, plot ------------------------------------------------------------------------------


def test_names_round_trip() -> None:
    solvers = peers.solver_points(["unipc", "heun"], "euler", [4, 14, 15], 28)
    for point in [*solvers, *peers.cache_points(["magcache", "fbc"], 28, [1.0])]:
        again = peers.point_from_name(point.variant.name, [1.0])
        assert again is not None and again == point and again.family == point.family
    assert [p.variant.name for p in peers.solver_points(["heun"], None, [14, 15], 28)] == [
        "solver=heun,steps=14"
    ]
    assert peers.point_from_name("steps=4") is None and peers.point_from_name("cat,steps=4") is None


def test_cat_on_a_solver_is_named_and_rebuilt() -> None:
    settings = FrontierSettings("m", "shapes", reference_steps=8)
    grid = parse_grid(["keep_ratio=0.5", "start_step=2"])
    points, _ = frontier_points(settings, [4], [6], grid, ["unipc"])
    cat = [point for point in points if point.kind == peers.CAT_SOLVER_KIND]
    assert [point.variant.name for point in cat] == ["cat,solver=unipc,steps=6,keep_ratio=0.5,start_step=2"]
    rebuilt = recorded_points([cat[0].variant.name], 0, [])
    assert rebuilt[0].variant == cat[0].variant and rebuilt[0].family == "cat on unipc"
    assert rebuilt[0].variant.config.keep_ratio == 0.5


def test_reference_solver_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown reference solver 'rk4'"):
        FrontierSettings("m", "shapes", reference_solver="rk4")


def test_sharpness_ranks_a_blurred_copy_below_the_image() -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    padded = np.pad(image.astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[i : i + 32, j : j + 32] for i in range(3) for j in range(3)) / 9
    assert peers.sharpness(image, image) == pytest.approx(100.0)
    assert peers.sharpness(blurred.astype(np.uint8), image) < 50


def test_best_curve_is_the_envelope_of_all_solvers() -> None:
    curves = {"a": [(1.0, 10.0), (3.0, 30.0)], "b": [(1.0, 20.0), (3.0, 22.0)]}
    assert peers.envelope(curves) == [(1.0, 20.0), (3.0, 30.0)]


def test_plot_has_every_method(tmp_path: Path) -> None:
    rows = [
        {"family": "euler steps", "kind": "fewer-steps", "macs_ratio": x, "psnr": 20 + 10 * x}
        for x in (0.3, 0.5)
    ] + [{"family": "pab", "kind": "cache", "macs_ratio": 0.6, "psnr": 25.0}]
    peers.plot_methods(rows, {"fbc": "TypeError: x"}, tmp_path / "methods.png", "title")
    assert (tmp_path / "methods.png").stat().st_size > 1000


# --- the command ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--solvers", "euler,rk4"], "unknown solver rk4; known: euler, unipc, dpm++2m, heun"),
        (["--cat-solvers", ""], "unknown solver ''"),
        (["--peers", "teacache"], "unknown peer teacache; known: fbc, taylorseer"),
        (["--reference-solver", "rk4"], "invalid choice: 'rk4'"),
    ],
)
def test_options_are_validated_in_one_line(
    option: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["frontier", "--model", "shapes-mmdit", "--prompts", "shapes", "--out", str(tmp_path), *option])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_the_frontier_with_peers_writes_every_output(tmp_path: Path) -> None:
    settings = FrontierSettings("shapes-mmdit", "shapes", reference_steps=6)
    rows = run_frontier(
        settings, [3], [6], parse_grid(["keep_ratio=0.5", "start_step=2"]), 1, tmp_path, "cpu", False,
        echo=lambda _: None, solvers=["euler", "unipc", "heun"], cat_solvers=["unipc"], caches=["fbc", "pab"],
    )  # fmt: skip
    assert rows is not None
    families = {row["family"] for row in rows if row["kind"] != "full"}
    assert families == {"euler steps", "unipc steps", "heun steps", "cat on euler", "cat on unipc", "pab"}
    with (tmp_path / "frontier.csv").open() as file:
        table = list(csv.DictReader(file))
    for column in (
        "method",
        "macs",
        "psnr",
        "ssim",
        "sharpness",
        "alignment_full",
        "seconds",
        "db_over_curve",
    ):
        assert column in table[0]
    refused = [line for line in table if line["kind"] == "error"]
    assert [line["method"] for line in refused] == ["fbc"] and refused[0]["error"].startswith("TypeError")
    assert "**fbc**" in (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "methods.png").is_file()
    assert json.loads((tmp_path / "peer-errors.json").read_text())["fbc"].startswith("TypeError")
