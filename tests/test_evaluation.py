"""The evaluation harness: methods, metrics, prompt sets, ``catprune eval``, resuming and data parallelism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from catprune.cli import main
from catprune.config import CATPruningConfig
from catprune.evaluation import (
    DEFAULT_CLIP_MODEL,
    SHEET_GAP,
    SHEET_HEADER,
    SHEET_LABEL,
    TIMING_RECORD_KEYS,
    EvalSettings,
    RunFolder,
    contact_sheet,
    equal_macs_steps,
    fidelity,
    load_clip_scorer,
    pooled_psnr,
    resolve_clip_model,
    resolve_methods,
    summarize,
    summary_markdown,
)
from catprune.prompts import PromptSetError, load_prompts
from catprune.runtime import load_pipeline, run_generation
from catprune.shapes import textures
from catprune.shapes.scenes import heldout_captions
from catprune.shapes.training import TrainConfig, build_pipeline

STEPS, START = 8, 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
"""One thread everywhere: the same arithmetic in every process, so images compare bit for bit."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random-weight shapes pipelines (32x32 pixels, 16x16 tokens) saved locally, by architecture."""
    models = {}
    for arch in ("pixart", "mmdit"):
        path = tmp_path_factory.mktemp("models") / f"tiny-{arch}"
        build_pipeline(TrainConfig(arch=arch, width=32, layers=2, text_layers=1, steps=1)).save_pretrained(
            path
        )
        models[arch] = str(path)
    return models


@pytest.fixture
def tiny_model(tiny_models: dict[str, str]) -> str:
    return tiny_models["pixart"]


def eval_args(model: str, out: Path, methods: str, num_prompts: int = 3, *extra: str) -> list[str]:
    return [
        "eval", "--model", model, "--prompts", "shapes", "--methods", methods,
        "--num-prompts", str(num_prompts), "--steps", str(STEPS), "--start-step", str(START),
        "--out", str(out), "--clip-model", "none", "--no-progress", *extra,
    ]  # fmt: skip


def records_without_timing(out: Path) -> list[dict[str, Any]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_RECORD_KEYS} for line in lines]


def table_without_timing(out: Path) -> list[list[str]]:
    """The summary's rows without the throughput and speed-up columns."""
    rows = [line.split("|") for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    return [cells[:3] + cells[5:] for cells in rows]


def same_images(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.glob("images/*/*.png"))
    assert files == sorted(p.relative_to(b) for p in b.glob("images/*/*.png"))
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# --- methods, prompts, metrics -------------------------------------------------------------------------


def test_methods_by_name_full_first_each_once() -> None:
    methods = resolve_methods(["cat", "at-edm", "cat", "fewer-steps", "full"])
    assert [m.name for m in methods] == ["full", "cat", "at-edm", "fewer-steps"]
    assert methods[2].start_delay == 1 and methods[3].equal_macs and methods[0].strategy is None
    with pytest.raises(ValueError, match=r"unknown method.*best.*known: full, cat"):
        resolve_methods(["best"])


def test_pruning_configs_differ_only_in_the_token_choice() -> None:
    settings = EvalSettings(model="m", prompts="shapes", keep_ratio=0.3, start_step=8, seed=5)
    methods = resolve_methods(["cat", "noise", "at-edm"])
    full, cat, noise, atedm = (settings.pruning_config(method) for method in methods)
    assert (cat.keep_ratio, cat.start_step, cat.seed) == (noise.keep_ratio, noise.start_step, noise.seed)
    assert (cat.strategy, noise.strategy, atedm.strategy, atedm.start_step) == ("cat", "noise", "at-edm", 9)
    assert not full.prune  # never pruned: the mechanism only counts its MACs


def test_unpruned_methods_never_prune_yet_count_macs() -> None:
    settings = EvalSettings(model="m", prompts="shapes")
    for method in resolve_methods(["fewer-steps"]):  # and full
        config = settings.pruning_config(method)
        assert config == CATPruningConfig.unpruned()


def test_prompt_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_prompts("shapes", 5, seed=1) == heldout_captions(5, 1)
    assert load_prompts("textures", 5, seed=1) == textures.heldout_captions(5, 1)
    assert load_prompts("textures", 3) == load_prompts("textures")[:3]
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\n  a dog  \na bird\n")
    assert load_prompts(file, 2) == ["a cat", "a dog"]
    with pytest.raises(PromptSetError, match=r"unknown prompt set 'nope'.*shapes, textures, parti, coco"):
        load_prompts("nope")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PromptSetError, match=r"needs the 'datasets' package.*catprune\[eval\]"):
        load_prompts("parti")


def test_hub_prompt_sets_fail_at_once_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Name or service not known")

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_dataset must not be tried when the hub is unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=must_not_run))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.dataset_info", unreachable)
    with pytest.raises(PromptSetError, match="cannot reach the hub dataset 'nateraw/parti-prompts'"):
        load_prompts("parti")
    rows = {"captions": [["a cat on a mat", "a cat"], ["two dogs"]]}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    assert load_prompts("coco", 5) == ["a cat on a mat", "two dogs"]


def test_fidelity_of_identical_and_different_images() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    psnr, ssim = fidelity(image, image)
    assert psnr == float("inf") and ssim == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + 8, 0, 255).astype(np.uint8)
    psnr, ssim = fidelity(noisy, image)
    assert 25 < psnr < 40 and 0 < ssim < 1


def test_pooled_psnr_is_that_of_the_mean_squared_error() -> None:
    assert pooled_psnr([30.0, 30.0]) == pytest.approx(30.0)
    assert pooled_psnr([30.0, float("inf")]) == pytest.approx(30.0 + 10 * np.log10(2))  # half the error
    assert pooled_psnr([float("inf")]) == float("inf") and pooled_psnr([]) is None


def tiny_clip(folder: Path) -> Path:
    """A random CLIP model with a byte-level BPE vocabulary (no merges) and 32x32 images, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))  # the bytes that byte-level BPE keeps as themselves
    printable = [b for first, last in ranges for b in range(ord(first), ord(last) + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(tokens), "max_position_embeddings": 77},
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_path = folder / "model"
    CLIPModel(config).save_pretrained(model_path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(model_path)
    return model_path


def test_clip_score_with_a_local_model_or_skipped_with_a_reason(tmp_path: Path) -> None:
    scorer, why = load_clip_scorer(str(tiny_clip(tmp_path / "clip")), torch.device("cpu"))
    assert scorer is not None and why == ""
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scores = [scorer(image, prompt) for prompt in ("a red circle", "a blue square in the top left")]
    assert all(0.0 <= score <= 100.0 for score in scores)
    assert scorer(image, "a red circle") == scores[0]  # one image at a time: no state carried over
    scorer, why = load_clip_scorer(str(tmp_path / "missing"), torch.device("cpu"))
    assert scorer is None and why.startswith("CLIP score skipped: cannot load")


# --- catprune eval -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["pixart", "mmdit"])
def test_eval_writes_images_records_and_the_table(
    arch: str, tiny_models: dict[str, str], tmp_path: Path, capsys: Any
) -> None:
    tiny_model, out = tiny_models[arch], tmp_path / "run"
    clip = tiny_clip(tmp_path / "clip")
    args = eval_args(tiny_model, out, "cat,at-edm,fewer-steps", 2, "--clip-model", str(clip))
    assert main(args) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    columns = ("MACs", "Throughput (img/s)", "Speed-up", "CLIP score", "Alignment (%)", "PSNR (dB)", "SSIM")
    assert all(column in header for column in columns)
    assert [line.split("|")[1].strip() for line in printed.splitlines()[2:6]] == [
        "full - 8 steps",
        "cat - 8 steps",
        "at-edm - 8 steps",
        f"fewer-steps - {json.loads((out / 'items/fewer-steps/00000.json').read_text())['steps']} steps",
    ]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["index"]) for r in records] == [
        (m, i) for m in ("full", "cat", "at-edm", "fewer-steps") for i in (0, 1)
    ]
    full, cat = records[0], records[2]
    assert "psnr" not in full and cat["psnr"] > 0 and 0 < cat["ssim"] <= 1
    assert set(cat["alignment"]) == {"background", "colour", "shape", "size", "position", "count", "full"}
    assert 0 <= cat["clip_score"] <= 100 and cat["macs"] < full["macs"] and cat["seed"] == 0
    assert len({r["session"] for r in records}) == 1 and all(r["cpus"] == os.cpu_count() for r in records)
    assert all(r["load"] is None or r["load"] >= 0 for r in records)
    assert list(cat)[:8] == ["method", "index", "prompt", "seed", "steps", "macs", "seconds", "session"]
    assert records[1]["seed"] == 1 and records[1]["prompt"] == heldout_captions(2)[1]

    # The full image is the unpatched pipeline's, from the prompt index's seed.
    pipe = load_pipeline(tiny_model, "cpu", "float32")
    image = run_generation(pipe, records[1]["prompt"], STEPS, 1).images[0]
    assert np.array_equal(image, RunFolder(out).read_image("full", 1))

    # A rerun finds everything done and rewrites the same table.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("items/*/*.json")}
    table = table_without_timing(out)
    assert main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("items/*/*.json")}
    assert table_without_timing(out) == table


def sheet_cell(sheet: Image.Image, row: int, column: int, size: tuple[int, int]) -> np.ndarray:
    """The pixels of a contact sheet's cell (``size``: the enlarged image's)."""
    left = SHEET_LABEL + column * (size[0] + SHEET_GAP)
    top = SHEET_HEADER + row * (size[1] + SHEET_GAP)
    return np.array(sheet.crop((left, top, left + size[0], top + size[1])))


def test_eval_writes_a_contact_sheet_of_the_images(tiny_model: str, tmp_path: Path) -> None:
    assert main(eval_args(tiny_model, tmp_path / "run", "cat", 2)) == 0
    with Image.open(tmp_path / "run" / "sheet.png") as sheet:
        sheet.load()
    cell = (32 * 4 + SHEET_GAP, 32 * 4 + SHEET_GAP)  # 32-pixel images enlarged 4 times, to 128
    assert sheet.size == (SHEET_LABEL + 2 * cell[0], SHEET_HEADER + 2 * cell[1])  # full, cat; 2 prompts
    cat = RunFolder(tmp_path / "run").read_image("cat", 1)
    assert np.array_equal(sheet_cell(sheet, 1, 1, (128, 128)), cat.repeat(4, axis=0).repeat(4, axis=1))

    # At most 8 prompts, only those every method finished; 64-pixel images enlarged twice.
    folder, images = RunFolder(tmp_path / "store"), np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3))
    for method, index in [(m, i) for m in ("full", "cat") for i in range(10) if (m, i) != ("cat", 1)]:
        folder.write_item({"method": method, "index": index}, images[index].astype(np.uint8))
    rows = [{"method": "full", "psnr": None}, {"method": "cat", "psnr": 23.14}]
    sheet = contact_sheet(folder, rows, 10)
    assert sheet.size == (SHEET_LABEL + 2 * cell[0], SHEET_HEADER + 8 * cell[1])
    enlarged = images[2].astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(sheet_cell(sheet, 1, 0, (128, 128)), enlarged)  # row 1 is prompt 2


def test_fewer_steps_match_cat_macs(tiny_model: str, tmp_path: Path) -> None:
    pipe = load_pipeline(tiny_model, "cpu", "float32")
    settings = EvalSettings(model=tiny_model, prompts="shapes", steps=20, start_step=8)
    fewer = equal_macs_steps(pipe, "a red circle on a white background", settings)
    assert main(eval_args(tiny_model, tmp_path, "cat", 1, "--steps", "20", "--start-step", "8")) == 0
    full, cat = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    full_step = full["macs"] / 20
    assert abs(fewer * full_step - cat["macs"]) <= full_step / 2
    assert 8 < fewer < 20


def test_a_rerun_with_other_settings_is_refused(tiny_model: str, tmp_path: Path, capsys: Any) -> None:
    assert main(eval_args(tiny_model, tmp_path, "cat", 1)) == 0
    assert main(eval_args(tiny_model, tmp_path, "cat", 1, "--keep-ratio", "0.5")) == 2
    assert "other settings (keep_ratio: 0.3 there, 0.5 now)" in capsys.readouterr().err


def test_offline_hub_prompts_are_a_one_line_error(tiny_model: str, tmp_path: Path, capsys: Any) -> None:
    args = eval_args(tiny_model, tmp_path, "cat")
    args[args.index("shapes")] = "parti"
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("catprune eval: error:") and "parti" in error.lower() and "\n" not in error


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_model: str, tmp_path: Path) -> None:
    methods, prompts = "cat,noise,at-edm", 6
    total = 4 * prompts
    catprune = [sys.executable, "-m", "catprune"]
    command = [*catprune, *eval_args(tiny_model, tmp_path / "killed", methods, prompts)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    items = tmp_path / "killed" / "items"
    deadline = time.monotonic() + 120
    while len(list(items.glob("*/*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= len(list(items.glob("*/*.json"))) < total, "the run was not killed mid-way"

    subprocess.run(command, env=ENV, check=True, capture_output=True)
    whole = [*catprune, *eval_args(tiny_model, tmp_path / "whole", methods, prompts)]
    subprocess.run(whole, env=ENV, check=True, capture_output=True)
    assert same_images(tmp_path / "killed", tmp_path / "whole")
    assert records_without_timing(tmp_path / "killed") == records_without_timing(tmp_path / "whole")
    assert len(records_without_timing(tmp_path / "whole")) == total
    assert table_without_timing(tmp_path / "killed") == table_without_timing(tmp_path / "whole")
    assert not list((tmp_path / "killed").glob("**/.*.tmp"))


@pytest.mark.slow
def test_two_processes_give_the_images_and_table_of_one(tiny_model: str, tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "accelerate is not installed: pip install -e '.[dev]'"
    methods, prompts = "cat,at-edm,fewer-steps", 5
    launch = [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "catprune"]
    two = subprocess.run(
        [*launch, *eval_args(tiny_model, tmp_path / "two", methods, prompts)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| full - 8 steps |") == 1  # the table is printed by the main process only
    one = [sys.executable, "-m", "catprune", *eval_args(tiny_model, tmp_path / "one", methods, prompts)]
    subprocess.run(one, env=ENV, check=True, capture_output=True)
    assert same_images(tmp_path / "one", tmp_path / "two")
    assert len({record["session"] for record in RunFolder(tmp_path / "two").records()}) == 1  # one launch
    assert records_without_timing(tmp_path / "one") == records_without_timing(tmp_path / "two")
    assert table_without_timing(tmp_path / "one") == table_without_timing(tmp_path / "two")


# --- the CLIP model by default, timings that are not a measurement ------------------------------------


def test_auto_clip_model_is_none_where_the_shapes_checker_measures_alignment(tiny_model: str) -> None:
    for shapes_model in ("shapes-mmdit", "shapes-pixart", tiny_model):
        assert resolve_clip_model("auto", shapes_model, "parti") is None
    assert resolve_clip_model("auto", "stabilityai/stable-diffusion-3-medium-diffusers", "shapes") is None
    assert resolve_clip_model("auto", "some/model", "textures") is None
    assert resolve_clip_model("auto", "textures-mmdit", "parti") is None
    assert resolve_clip_model("auto", "stabilityai/stable-diffusion-3-medium-diffusers", "parti") == (
        DEFAULT_CLIP_MODEL
    )
    assert resolve_clip_model("AUTO", "some/model", "prompts.txt") == DEFAULT_CLIP_MODEL
    assert resolve_clip_model("none", "some/model", "parti") is None
    assert resolve_clip_model("None", "some/model", "parti") is None
    assert resolve_clip_model(None, "some/model", "parti") is None
    assert resolve_clip_model("my/clip", "shapes-mmdit", "shapes") == "my/clip"  # a name forces it


def test_eval_of_a_shapes_model_by_default_has_no_clip_score(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no CLIP model is loaded for a shapes run by default")

    monkeypatch.setattr("catprune.evaluation.load_clip_scorer", must_not_load)
    args = eval_args(tiny_model, tmp_path, "cat", 1)
    del args[args.index("--clip-model") : args.index("--clip-model") + 2]
    assert main(args) == 0
    assert "clip" not in (tmp_path / "summary.md").read_text().lower()
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["clip_model"] is None  # resolved
    assert main([*args, "--clip-model", "none"]) == 0  # the same settings: the run resumes


def test_a_resumed_run_marks_its_timings(tiny_model: str, tmp_path: Path) -> None:
    assert main(eval_args(tiny_model, tmp_path, "cat", 1)) == 0
    assert "sessions" not in (tmp_path / "summary.md").read_text()
    assert main(eval_args(tiny_model, tmp_path, "cat", 2)) == 0  # one more prompt, in a new session
    summary = (tmp_path / "summary.md").read_text()
    assert "mix timings from 2 sessions" in summary and "fresh `--out`" in summary
    for line in summary.splitlines()[2:4]:
        throughput, speedup = line.split("|")[3:5]
        assert throughput.strip().endswith("*") and speedup.strip().endswith("x*")


def timed_record(method: str, index: int, seconds: float, **timing: Any) -> dict[str, Any]:
    return {"method": method, "index": index, "steps": 8, "macs": 100.0, "seconds": seconds, **timing}


def timing_table(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]], str]:
    """(rows, each row's throughput and speed-up cells, the notes) of a summary of ``records``."""
    rows = summarize(records, ["full", "cat"])
    markdown = summary_markdown(rows, EvalSettings(model="m", prompts="p", clip_model=None), 2)
    lines = markdown.splitlines()
    cells = [[cell.strip() for cell in line.split("|")[3:5]] for line in lines[2:4]]
    return rows, cells, "\n".join(lines[5:])


def test_timings_of_one_session_on_an_idle_machine_are_not_marked() -> None:
    quiet = {"session": "a", "load": 1.0, "cpus": 8}
    records = [timed_record(m, i, s, **quiet) for m, s in (("full", 2.0), ("cat", 1.0)) for i in (0, 1)]
    rows, cells, notes = timing_table(records)
    assert cells == [["0.500", "1.00x"], ["1.000", "2.00x"]]
    assert "*" not in notes and "busy" not in notes and "sessions" not in notes
    conditions = [(row["sessions"], row["load"], row["cpus"], row["busy"]) for row in rows]
    assert conditions == [(["a"], 1.0, 8, False)] * 2


def test_timings_from_two_sessions_are_marked() -> None:
    records = [
        timed_record("full", 0, 2.0, session="a", load=1.0, cpus=8),
        timed_record("cat", 0, 1.0, session="a", load=1.0, cpus=8),
        timed_record("full", 1, 2.0, session="b", load=1.0, cpus=8),
        timed_record("cat", 1, 9.0, session="b", load=1.0, cpus=8),
    ]
    _, cells, notes = timing_table(records)
    # cat's 9 s is also more than 3x its fastest image: an outlier besides.
    assert cells == [["0.500*", "1.00x*"], ["0.200*†", "0.40x*†"]]
    assert "mix timings from 2 sessions" in notes and "resumed" in notes and "fresh `--out`" in notes
    # A method added to a finished run: each row's timings are of one session, the table's of two.
    records = [timed_record("full", 0, 2.0, session="a"), timed_record("cat", 0, 1.0, session="b")]
    _, cells, notes = timing_table(records)
    assert all(cell.endswith("*") for row in cells for cell in row) and "2 sessions" in notes


def test_timings_on_a_busy_machine_are_marked() -> None:
    loads = {"full": (1.0, 2.0, 3.0), "cat": (9.0, 20.0, 1.0)}  # cat's median: 9 on 8 cores
    records = [
        timed_record(method, i, 2.0 if method == "full" else 1.0, session="a", load=load, cpus=8)
        for method in ("full", "cat")
        for i, load in enumerate(loads[method])
    ]
    rows, cells, notes = timing_table(records)
    assert [row["busy"] for row in rows] == [False, True] and rows[1]["load"] == 9.0
    assert cells == [["0.500", "1.00x"], ["1.000*", "2.00x*"]]
    assert "machine busy (load average 9.0 on 8 cores) while timing `cat`" in notes
    assert "sessions" not in notes and "while timing `full`" not in notes
    # full, the reference, timed on a busy machine: every speed-up is marked.
    for record in records:
        record["load"] = 12.0 if record["method"] == "full" else 1.0
    _, cells, notes = timing_table(records)
    assert cells == [["0.500*", "1.00x*"], ["1.000", "2.00x*"]]
    assert "machine busy (load average 12.0 on 8 cores) while timing `full`" in notes


def test_a_stalled_image_is_an_outlier_marked_once_with_the_reason() -> None:
    """The first images of a method that stall (a machine's hiccup, one-off work) against the others:
    their row's cells get the outlier mark and one note names the worst."""
    quiet = {"session": "a", "load": 1.0, "cpus": 8}
    seconds = {"full": (25.0, 0.5, 0.5, 0.5), "cat": (0.3, 0.3, 0.31, 0.3)}
    records = [timed_record(m, i, s, **quiet) for m, times in seconds.items() for i, s in enumerate(times)]
    rows, cells, notes = timing_table(records)
    assert [row["outliers"] for row in rows] == [[(0, 25.0)], []]
    # full has an outlier: its cells and, as the reference, every speed-up.
    assert cells == [["2.000†", "1.00x†"], ["3.333", "1.67x†"]]
    assert notes.count("`†`") == 1 and "*" not in notes
    assert "1 image of 1 row took more than 3x the fastest image of their row" in notes
    assert "`full` image 0, 25.00 s against a median of 0.50 s" in notes
    assert "not a measurement" not in notes  # one stall of four: the median is that of the others
    # Half of a row's images stalled: its median is one of them, and the note says it is no measurement.
    seconds = {"full": (25.0, 22.0, 0.5, 0.5), "cat": (0.3, 0.3, 0.31, 0.3)}
    records = [timed_record(m, i, s, **quiet) for m, times in seconds.items() for i, s in enumerate(times)]
    rows, cells, notes = timing_table(records)
    assert rows[0]["outliers"] == [(0, 25.0), (1, 22.0)]
    assert "In `full` half or more of the images stalled" in notes and "not a measurement" in notes
    assert "--threads 1" in notes


def test_the_busy_note_is_one_clause_however_many_rows() -> None:
    """A frontier of many settings on a busy machine: one note, the rows counted, not one clause each."""
    records = [
        timed_record(f"s{n}", i, 1.0, session="a", load=3.0 + n / 10, cpus=2)
        for n in range(27)
        for i in (0, 1)
    ]
    for record in records[:2]:
        record["method"] = "full"
    names = ["full", *(f"s{n}" for n in range(1, 27))]
    rows = summarize(records, names)
    markdown = summary_markdown(rows, EvalSettings(model="m", prompts="p", clip_model=None), 2)
    assert markdown.count("`*`") == 1 and markdown.count("while timing") == 1
    assert "machine busy (load average 3.0 to 5.6 on 2 cores) while timing every row" in markdown
    for record in records:
        record["load"] = 5.7 + record["index"] / 100  # the same to one decimal: written once
    markdown = summary_markdown(summarize(records, names), EvalSettings(model="m", prompts="p"), 2)
    assert "machine busy (load average 5.7 on 2 cores) while timing every row" in markdown
    # A few rows, named, in one clause where their loads read alike.
    loads = {"x": 2.01, "y": 2.04, "z": 2.03}
    few = [timed_record(m, 0, 1.0, session="a", load=load, cpus=2) for m, load in loads.items()]
    few[0]["method"] = "full"
    markdown = summary_markdown(summarize(few, ["full", "y", "z"]), EvalSettings(model="m", prompts="p"), 1)
    assert markdown.count("while timing") == 1 and markdown.count("`*`") == 1
    assert "machine busy (load average 2.0 on 2 cores) while timing `full`, `y` and `z`" in markdown


def test_each_method_is_warmed_up_once_before_its_first_timed_image(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import catprune.evaluation as evaluation

    events: list[tuple[str, ...]] = []
    warm_up, run_item = evaluation.warm_up, evaluation.run_item

    def spy_warm_up(pipe, prompt, steps, seed, config, guidance_scale):
        events.append(("warm", str(steps), str(config.prune), str(config.start_step)))
        warm_up(pipe, prompt, steps, seed, config, guidance_scale)

    def spy_run_item(context, variant, index):
        events.append(("item", variant.name, str(index)))
        return run_item(context, variant, index)

    monkeypatch.setattr(evaluation, "warm_up", spy_warm_up)
    monkeypatch.setattr(evaluation, "run_item", spy_run_item)
    threads = torch.get_num_threads()
    try:
        assert main(eval_args(tiny_model, tmp_path, "cat,at-edm", 2)) == 0
        records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert {record["threads"] for record in records} == {1}  # a small model on the CPU: one thread
        assert events == [
            ("warm", str(STEPS), "False", "8"),
            ("item", "full", "0"),
            ("warm", str(STEPS), "True", str(START)),
            ("item", "cat", "0"),
            ("warm", str(STEPS), "True", str(START + 1)),
            ("item", "at-edm", "0"),
            *(("item", name, "1") for name in ("full", "cat", "at-edm")),
        ]
        events.clear()
        assert main(eval_args(tiny_model, tmp_path, "cat,at-edm", 2)) == 0
        assert events == []  # nothing left to time: no warm-up either
        assert main(eval_args(tiny_model, tmp_path / "two", "cat", 1, "--threads", "2")) == 0
        assert json.loads((tmp_path / "two/items/cat/00000.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(threads)


def test_a_warm_up_runs_each_kind_of_step_once_and_no_more() -> None:
    from catprune.runtime import warm_up_steps

    assert warm_up_steps(28, CATPruningConfig()) == 10  # 8 full, the fill step, one pruned step
    assert warm_up_steps(28, CATPruningConfig(start_step=9)) == 11
    assert warm_up_steps(9, CATPruningConfig()) == 9
    assert warm_up_steps(28, CATPruningConfig.unpruned()) == warm_up_steps(28) == 2
    assert warm_up_steps(1) == 1


def test_records_of_older_versions_are_one_unknown_session() -> None:
    old = [timed_record(m, i, s) for m, s in (("full", 2.0), ("cat", 1.0)) for i in (0, 1)]
    rows, cells, notes = timing_table(old)
    assert cells == [["0.500", "1.00x"], ["1.000", "2.00x"]] and "*" not in notes
    conditions = [(row["sessions"], row["load"], row["cpus"], row["busy"]) for row in rows]
    assert conditions == [(["unknown"], None, None, False)] * 2
    # resumed by this version: two sessions, one of them unknown
    new = [timed_record(m, 2, s, session="b", load=None, cpus=None) for m, s in (("full", 2.0), ("cat", 1.0))]
    _, cells, notes = timing_table(old + new)
    assert cells == [["0.500*", "1.00x*"], ["1.000*", "2.00x*"]]
    assert "mix timings from 2 sessions (some by a version that did not record sessions)" in notes


# --- textured captions: the checker does not read the backdrop -------------------------------------------


def alignment_record(method: str, index: int, **scores: float) -> dict[str, Any]:
    return {"method": method, "index": index, "steps": 8, "macs": 1, "seconds": 1.0, "alignment": scores}


def test_textured_scores_have_no_background_which_counts_neither_right_nor_wrong() -> None:
    right = {key: 1.0 for key in ("full", "count", "colour", "shape", "size", "position")}
    records = [
        alignment_record("full", 0, **right),  # textured: no background
        alignment_record("full", 1, **{**right, "full": 0.0, "colour": 0.5}),
        alignment_record("cat", 0, **right, background=1.0),  # a shapes caption in the same run
        alignment_record("cat", 1, **right),
    ]
    full, cat = summarize(records, ["full", "cat"])
    assert full["alignment_background"] is None and full["alignment_full"] == 50.0
    assert full["alignment_colour"] == 75.0 and full["alignment_count"] == 100.0
    assert cat["alignment_background"] == 100.0 and cat["alignment_full"] == 100.0
    table = summary_markdown([full, cat], EvalSettings(model="m", prompts="textures"), 2)
    assert "| 50.0 | 93.8 |" in table  # Alignment, Attributes (mean of colour, shape, size, position)
    assert "the background is not scored" in table
    shapes_only = summarize(records[2:3], ["cat"])
    assert "not scored" not in summary_markdown(shapes_only, EvalSettings(model="m", prompts="shapes"), 1)


def test_eval_on_textures_prompts_scores_alignment_without_background(tmp_path: Path) -> None:
    """A tiny random 64x64 model (32x32 tokens) of the textures grammar, 1 prompt: the rows' alignment."""
    model = tmp_path / "tiny-textures"
    config = TrainConfig(data="textures", arch="mmdit", width=32, layers=1, text_layers=1, steps=1)
    build_pipeline(config).save_pretrained(model)
    out = tmp_path / "run"
    args = eval_args(str(model), out, "cat", 1, "--steps", "4", "--start-step", "2")
    args[args.index("shapes")] = "textures"
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == textures.heldout_captions(1) * 2
    assert all(set(record["alignment"]) == {"colour", "shape", "size", "position", "count", "full"}
               for record in records)  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert "Alignment (%)" in summary and "the background is not scored" in summary
