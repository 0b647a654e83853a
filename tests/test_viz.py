"""``catprune viz``: each figure's PNG, its layout, and that the plotted data come from the real run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catprune import viz
from catprune.adapters import adapter_for
from catprune.cli import main
from catprune.engine import StepMode, StepRecord
from catprune.shapes.pipelines import load_shapes_pipeline
from catprune.shapes.training import ARCHES, TrainConfig, build_pipeline
from catprune.tools.viz import DEFAULT_PROMPTS, default_prompts

PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue square at the top left on a black background",
]
STEPS, START = 6, 3
"""Short generations: steps 0-1 full, 2 fills the caches, 3-5 are pruned."""
TOKENS, KEPT = 256, 77
"""The shapes models' 16x16 token grid and round(0.3 * 256)."""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny random-weight shapes pipelines saved as folders, as ``--model PATH`` takes them, by arch."""
    paths: dict[str, Path] = {}

    def saved(arch: str) -> Path:
        if arch not in paths:
            paths[arch] = tmp_path_factory.mktemp(f"shapes-{arch}")
            config = TrainConfig(arch=arch, width=32, layers=1, text_layers=1, steps=1)
            build_pipeline(config).save_pretrained(paths[arch])
        return paths[arch]

    return saved


@pytest.fixture(params=ARCHES)
def any_model_dir(request: pytest.FixtureRequest, saved_models: Callable[[str], Path]) -> Path:
    return saved_models(request.param)


@pytest.fixture
def model_dir(saved_models: Callable[[str], Path]) -> Path:
    """The default architecture: the figures' code does not depend on it, the pipelines' checks do."""
    return saved_models("mmdit")


def run_viz(model_dir: Path, out: Path, figure: str, *options: str, prompts: list[str] = PROMPTS) -> dict:
    """Run the command, check the PNG against the layout it reports, and return the saved info."""
    argv = ["viz", figure, "--model", str(model_dir), "--prompts", *prompts, "--out", str(out)]
    assert main([*argv, "--steps", str(STEPS), "--start-step", str(START), *options]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert list(image.size) == info["layout"]["size"]
    return info


def arrays(out: Path) -> dict[str, np.ndarray]:
    with np.load(out.with_suffix(".npz")) as saved:
        return dict(saved)


def test_noise_correlation_plots_the_runs_relative_noise(any_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "noise.png"
    info = run_viz(any_model_dir, out, "noise-correlation")
    data = arrays(out)
    r = float(np.corrcoef(data["previous"], data["current"])[0, 1])
    assert info["pearson_r"] == pytest.approx(r, abs=1e-12)
    figure = viz.DRAW["noise-correlation"](viz.load_figure_data(out))
    assert f"Pearson r = {r:.3f}" in figure.get_suptitle()
    assert info["layout"]["panels"] == 1

    # The same quantities from an unpruned run, read at the output projection with a plain hook.
    pipe = load_shapes_pipeline(any_model_dir)
    outputs: list[torch.Tensor] = []
    projection = pipe.transformer.get_submodule(adapter_for(pipe.transformer).scatter_point)
    handle = projection.register_forward_hook(lambda module, args, output: outputs.append(output))
    pipe(prompt=PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    handle.remove()
    noise = [adapter_for(pipe.transformer).noise_tokens(pipe.transformer, o[len(PROMPTS) :]) for o in outputs]
    norms = torch.stack([(n - noise[START - 2]).norm(dim=-1) for n in noise[START - 1 :]]).numpy()
    np.testing.assert_allclose(data["previous"], norms[:-1].ravel(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(data["current"], norms[1:].ravel(), rtol=1e-3, atol=1e-4)
    assert sorted(set(data["step"])) == list(range(START, STEPS))


def test_selection_panels_and_masks(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "selection.png"
    info = run_viz(model_dir, out, "selection", "--panels", "2", prompts=PROMPTS[:1])
    data = arrays(out)
    assert info["strategies"] == ["noise", "noise+balance"]
    assert info["layout"]["panels"] == 2 * 2 * (2 + 1)  # 2 strategies x (selection, noise) x (2 steps + 1)
    assert data["masks"].shape == (2, 2, 16, 16)
    assert (data["masks"].sum(axis=(2, 3)) == KEPT).all()
    assert list(data["steps"]) == [START, STEPS - 1]
    assert data["noise"].shape == (2, 2, 32, 32, 3)
    assert (data["frequency"].sum(axis=(1, 2)) == (STEPS - START) * KEPT).all()


def test_strategies_full_column_is_the_unpruned_pipeline(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "strategies.png"
    info = run_viz(model_dir, out, "strategies")
    data = arrays(out)
    assert info["columns"] == ["noise+balance", "cat", "rows", "full"]
    assert info["layout"]["panels"] == len(PROMPTS) * 4
    assert data["images"].shape == (len(PROMPTS), 4, 32, 32, 3)
    pipe = load_shapes_pipeline(model_dir)
    full = pipe(prompt=PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(data["images"][:, -1], np.stack([np.asarray(image) for image in full]))
    assert data["macs"][-1] == data["full_macs"][-1]
    assert (data["macs"][:-1] < data["full_macs"][:-1]).all()


def test_clusters(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clusters.png"
    info = run_viz(model_dir, out, "clusters")
    data = arrays(out)
    assert info["layout"]["panels"] == 2 * len(PROMPTS)
    assert data["labels"].shape == (len(PROMPTS), 16, 16)
    assert data["labels"].min() >= 0 and data["labels"].max() == info["num_clusters"] - 1


def test_alpha_sweep_macs_grow_with_the_keep_ratio(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    info = run_viz(model_dir, out, "alpha-sweep", prompts=PROMPTS[:1])
    data = arrays(out)
    assert info["layout"]["panels"] == 5
    assert list(data["keep_ratios"]) == [0.2, 0.3, 0.5, 0.8, 1.0]
    assert (np.diff(data["macs"]) > 0).all()
    assert data["macs"][-1] == data["full_macs"][-1]


def test_frequency_counts_the_pruned_steps(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "frequency.png"
    info = run_viz(model_dir, out, "frequency", "--strategy", "rows")
    data = arrays(out)
    assert info["layout"]["panels"] == 2 * len(PROMPTS)
    assert info["pruned_steps"] == STEPS - START
    frequency = data["frequency"].reshape(len(PROMPTS), TOKENS)
    assert (frequency.sum(axis=1) == (STEPS - START) * KEPT).all()
    # "rows" takes consecutive tokens in raster order: 3 x 77 tokens from token 0 on, once each.
    assert (frequency[:, : 3 * KEPT] == 1).all() and (frequency[:, 3 * KEPT :] == 0).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["noise-correlation", "--prompts", "a", "--steps", "3", "--start-step", "3", "--out", "f.png"],
            "--steps",
        ),
        (["selection", "--prompts", "a", "b", "--out", "f.png"], "one prompt"),
        (["clusters", "--prompts", "a", "--out", "f.jpg"], ".png"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", argv[0], "--model", "shapes-mmdit", *argv[1:]]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_clusters_without_prompts_draws_the_default_shapes_prompts(tmp_path: Path) -> None:
    out = tmp_path / "clusters.png"
    assert main(["viz", "clusters", "--model", "shapes-mmdit", "--steps", "10", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["prompts"] == list(DEFAULT_PROMPTS)
    assert arrays(out)["labels"].shape == (len(DEFAULT_PROMPTS), 16, 16)


def test_selection_defaults_to_one_prompt() -> None:
    assert default_prompts("selection") == [DEFAULT_PROMPTS[1]]
    assert default_prompts("strategies") == list(DEFAULT_PROMPTS) and len(DEFAULT_PROMPTS) == 3


def test_recorder_copies_what_the_observer_is_handed() -> None:
    """The recorder keeps CPU copies of the prompt rows it is handed, not views of the device tensors."""
    recorder = viz.GenerationRecorder(keep_noise=True)
    noise, indices = torch.randn(2, 4, 3), torch.tensor([[0, 2], [1, 3]])
    reference, labels = torch.randn(2, 4, 3), torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    recorder(StepRecord(0, StepMode.FULL, 2, 2, None, noise, None, None))
    recorder(StepRecord(1, StepMode.FILL, 2, 2, None, noise, reference, None))
    recorder(StepRecord(2, StepMode.PRUNED, 2, 2, indices, noise, reference, labels))
    assert (recorder.num_prompts, recorder.height, recorder.width) == (2, 2, 2)
    assert [step.noise is None for step in recorder.steps] == [True, False, False]
    for tensor in (noise, indices, reference, labels):
        tensor.zero_()  # the device tensors change after the call: the recorder's copies must not
    assert recorder.steps[2].indices.tolist() == [[0, 2], [1, 3]]
    assert recorder.steps[2].noise.abs().sum() > 0 and recorder.reference.abs().sum() > 0
    assert recorder.labels.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert recorder.frequency().tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    recorder(StepRecord(0, StepMode.FULL, 2, 2, None, torch.randn(1, 4, 3), None, None))
    assert len(recorder.steps) == recorder.num_prompts == 1
    assert recorder.reference is None and recorder.labels is None
