"""The evaluation harness behind ``catprune eval``: the paper's Tables 2 and 3 on any supported pipeline.

Methods run at equal budget (same keep ratio, start step and cache-and-reuse; only the token choice
differs), plus the unpruned model and the unpruned model at fewer steps of equal MACs. One image per
(method, prompt index), seeded by the prompt index, so any process computes any item identically; that
makes runs data-parallel (``accelerate launch``, prompts split by index) and resumable: an item is one
PNG and one JSON record, each written to a temporary file and renamed into place (the record last), so
a run killed at any moment leaves whole items only and a rerun skips them. Fidelity (PSNR, SSIM) is
measured against the full model's image of the same prompt and seed, which is why ``full`` always runs
first. Each record also says in which session (one launch of the command, all its processes alike) and
under which machine load its image was timed, so that a table whose timings mix sessions (a resumed run)
or come from a busy machine marks its throughput and speed-up instead of presenting them as results.
``docs/evaluation.md`` describes the outputs.

What generates is a :class:`Variant` (name, steps, pruning config): ``eval`` makes one per method,
``catprune frontier`` (:mod:`catprune.frontier`) one per step count and pruned setting, and both run them
with :func:`open_run` and :func:`run_items` and tabulate them with :func:`summarize` and the column helpers.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .config import CATPruningConfig
from .formatting import format_count, plural
from .measure import machine_load
from .names import AUTO_CLIP, DEFAULT_CLIP_MODEL, METHOD_ORDER
from .prompts import load_prompts
from .runtime import load_pipeline, psnr, run_generation, use_cpu_threads, warm_up
from .strategies import STRATEGIES

ALIGNMENT_KEYS = ("full", "background", "count", "colour", "shape", "size", "position")
"""What the shapes checker scores; ``full``: the image matches its caption in every respect. A textured
caption's score has no ``background`` (the checker does not read textured backdrops): not applicable, so
it counts neither as right nor as wrong, and ``full`` covers the rest."""
ALIGNED_PROMPT_SETS = ("shapes", "textures")
"""The prompt sets whose images the shapes checker scores (their captions are in its grammars)."""
TIMING_KEYS = ("throughput", "speedup")
"""Summary columns that depend on the machine and its load (the rest are reproducible bit for bit)."""
TIMING_RECORD_KEYS = ("seconds", "session", "load", "cpus", "threads")
"""Record fields that depend on when and where an item ran: its generation time, the session it ran in
(one launch of ``catprune eval``), the machine's 1-minute load average right after it, the machine's
CPU count (load and cpus None where unknown) and torch's CPU threads. Records of older versions have only
``seconds``."""
OUTLIER_FACTOR = 3.0
"""An image whose generation took more than this many times its row's fastest is a timing outlier: every
image of a row runs the same steps on the same shapes, so such a time is the machine's stall, not the
method's cost."""
UNKNOWN_SESSION = "unknown"
"""The session of records written before records named theirs (all of them count as one session)."""
REFERENCE = "full"
"""The row whose image of each prompt is the reference of fidelity and speed-up; it runs first on every
prompt."""


@dataclass(frozen=True)
class Method:
    """How one row of the table generates: a token-choice strategy under CAT's mechanism, or none."""

    name: str
    strategy: str | None
    """A name in ``catprune.strategies.STRATEGIES``; None runs the unpruned model."""
    start_delay: int = 0
    """Steps after t0 at which pruning starts (AT-EDM's baseline: step 9 for the paper's t0 = 8)."""
    equal_macs: bool = False
    """Run the unpruned model with the number of steps whose MACs are closest to CAT's."""


SPECIAL_METHODS: dict[str, Method] = {
    "full": Method("full", None),
    "fewer-steps": Method("fewer-steps", None, equal_macs=True),
    # The CAT paper's AT-EDM baseline: same budget and cache-and-reuse, pruning from step 9 (Sec. 4.1).
    "at-edm": Method("at-edm", "at-edm", start_delay=1),
}


PAPER_ORDER = METHOD_ORDER
"""The table's rows: the method, its baseline, its ablations (Fig. 4, Fig. 6), chance, fewer steps."""


def method_names() -> list[str]:
    """Every selectable method: the paper's table order, then any other registered strategy."""
    return [*PAPER_ORDER, *sorted(set(STRATEGIES) - set(PAPER_ORDER))]


def resolve_methods(names: Iterable[str]) -> list[Method]:
    """Methods by name, ``full`` first (the reference of speed-up and fidelity), each once, in order."""
    ordered = ["full", *(name for name in names if name != "full")]
    unknown = [name for name in ordered if name not in SPECIAL_METHODS and name not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(method_names())}")
    return [SPECIAL_METHODS.get(name, Method(name, name)) for name in dict.fromkeys(ordered)]


def is_shapes_model(model: str | Path) -> bool:
    """A shipped shapes model's name or a folder holding a saved shapes pipeline."""
    from .shapes.pipelines import SHIPPED_MODELS, shapes_pipeline_class

    return str(model) in SHIPPED_MODELS or shapes_pipeline_class(model) is not None


def resolve_clip_model(clip_model: str | None, model: str | Path, prompts: str | Path) -> str | None:
    """The CLIP model a run scores with, from ``--clip-model``: None (or ``none``) disables the CLIP
    score, a name or path forces it, ``auto`` means none for the shapes models and the shapes and textures
    prompts (the shapes checker is the alignment metric there, and CLIP knows nothing of these small
    synthetic images) and :data:`DEFAULT_CLIP_MODEL` for any other model. Nothing is loaded or downloaded
    here."""
    if clip_model is None or clip_model.strip().lower() == "none":
        return None
    if clip_model.strip().lower() != AUTO_CLIP:
        return clip_model
    if str(prompts) in ALIGNED_PROMPT_SETS or is_shapes_model(model):
        return None
    return DEFAULT_CLIP_MODEL


@dataclass(frozen=True)
class EvalSettings:
    """What fixes every image of a run; a rerun into the same folder must use the same settings."""

    model: str
    prompts: str
    steps: int = 28
    keep_ratio: float = 0.3
    start_step: int = 8
    seed: int = 0
    guidance_scale: float | None = None
    """None: the pipeline's default."""
    dtype: str = "auto"
    clip_model: str | None = DEFAULT_CLIP_MODEL
    """The resolved CLIP model (:func:`resolve_clip_model`); None: no CLIP score. ``auto`` is resolved
    by :func:`run_evaluation` before the settings are recorded or compared."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        CATPruningConfig(keep_ratio=self.keep_ratio, start_step=self.start_step)  # validates both

    def pruning_config(self, method: Method) -> CATPruningConfig:
        """The method's pruning settings; unpruned methods get :meth:`CATPruningConfig.unpruned` (the model
        computes exactly as without pruning while the mechanism still counts its MACs)."""
        if method.strategy is None:
            return CATPruningConfig.unpruned()
        return CATPruningConfig(
            keep_ratio=self.keep_ratio,
            start_step=self.start_step + method.start_delay,
            seed=self.seed,
            strategy=method.strategy,
        )


# --- per-image metrics ---------------------------------------------------------------------------------


def fidelity(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of a uint8 image against the full model's (SSIM: torchmetrics, data range 255)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def as_batch(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).permute(2, 0, 1)[None].double()

    ssim = structural_similarity_index_measure(as_batch(image), as_batch(reference), data_range=255.0)
    return psnr(image, reference), float(ssim)


def shapes_alignment(image: np.ndarray, prompt: str) -> dict[str, float]:
    """The shapes checker's scores (booleans as 0/1); no ``background`` for a textured caption."""
    from .shapes.checker import score

    return {key: float(value) for key, value in score(image, prompt).items()}


class ClipScorer:
    """CLIP score as torchmetrics defines it: 100 * max(cos(image embedding, text embedding), 0).

    Computed here from the CLIP model's projected embeddings: torchmetrics 1.9's ``CLIPScore`` breaks with
    transformers 5, whose ``get_image_features`` returns a model output instead of a tensor."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_tokens = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str) -> float:
        inputs = self.processor(
            text=[prompt],
            images=[image],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
        ).to(self.device)
        output = self.model(**inputs)
        cosine = F.cosine_similarity(output.image_embeds.float(), output.text_embeds.float())
        return float(100 * cosine.clamp(min=0))


def load_clip_scorer(name: str, device: torch.device) -> tuple[ClipScorer | None, str]:
    """(scorer, "") or (None, why it is skipped). A local copy or the cache is tried first, then the hub
    after one quick reachability check, so offline the answer comes at once."""
    from transformers import CLIPModel, CLIPProcessor

    def load(**kwargs: Any) -> ClipScorer:
        return ClipScorer(
            CLIPModel.from_pretrained(name, **kwargs), CLIPProcessor.from_pretrained(name, **kwargs), device
        )

    try:
        return load(local_files_only=True), ""
    except Exception as local_error:
        if Path(name).exists():
            return None, f"CLIP score skipped: cannot load the CLIP model in {name} ({local_error})"
    try:
        import huggingface_hub

        huggingface_hub.model_info(name, timeout=10)
        return load(), ""
    except Exception as error:
        return None, f"CLIP score skipped: cannot load {name!r} ({type(error).__name__}: {error})"


# --- one run: items on disk ----------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


class RunFolder:
    """The files of one run: ``run.json`` (settings, prompts), ``images/<method>/<index>.png``,
    ``items/<method>/<index>.json`` (one record per image, the proof that the item is done),
    ``results.jsonl``, ``summary.md`` and ``sheet.png``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def image_path(self, method: str, index: int) -> Path:
        return self.root / "images" / method / f"{index:05d}.png"

    def record_path(self, method: str, index: int) -> Path:
        return self.root / "items" / method / f"{index:05d}.json"

    def done(self, method: str, index: int) -> bool:
        return self.record_path(method, index).is_file()

    def write_item(self, record: dict[str, Any], image: np.ndarray) -> None:
        """Image first, record last: a record on disk means its image is whole."""
        method, index = record["method"], record["index"]
        atomic_write(self.image_path(method, index), lambda p: Image.fromarray(image).save(p, format="PNG"))
        atomic_write(self.record_path(method, index), lambda p: p.write_text(json.dumps(record) + "\n"))

    def read_image(self, method: str, index: int) -> np.ndarray:
        with Image.open(self.image_path(method, index)) as image:
            return np.array(image.convert("RGB"))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(path.read_text()) for path in sorted(self.root.glob("items/*/*.json"))]

    def start(self, settings: Any, prompts: Sequence[str]) -> None:
        """Record the settings (a dataclass: :class:`EvalSettings`, or a settings class of another command
        built on this harness) and prompts, or check that they match those of the run being resumed; remove
        the temporary files a killed run left (no process writes yet when this runs)."""
        for leftover in self.root.glob("**/.*.tmp"):
            leftover.unlink()
        path = self.root / "run.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            different = {
                key: (saved["settings"].get(key), value)
                for key, value in asdict(settings).items()
                if saved["settings"].get(key) != value
            }
            if different:
                details = ", ".join(
                    f"{key}: {old!r} there, {new!r} now" for key, (old, new) in different.items()
                )
                raise ValueError(
                    f"{self.root} holds a run with other settings ({details}); use another --out"
                )
            common = min(len(saved["prompts"]), len(prompts))
            if saved["prompts"][:common] != list(prompts[:common]):
                raise ValueError(f"{self.root} holds a run with other prompts; use another --out")
            if len(saved["prompts"]) >= len(prompts):
                return
        body = {"settings": asdict(settings), "prompts": list(prompts)}
        atomic_write(path, lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))


# --- the run -------------------------------------------------------------------------------------------


def equal_macs_steps(pipe: Any, prompt: str, settings: EvalSettings) -> int:
    """Steps of the unpruned model whose MACs are closest to CAT's at ``settings.steps``, from one short
    CAT generation (t0 full steps and one pruned step; a step's MACs do not depend on the prompt)."""
    if settings.start_step >= settings.steps:
        return settings.steps
    stats = run_generation(
        pipe,
        prompt,
        settings.start_step + 1,
        settings.seed,
        config=settings.pruning_config(Method("cat", "cat")),
        guidance_scale=settings.guidance_scale,
    ).stats
    assert stats is not None
    full_step = stats.full_macs / stats.steps
    pruned_step = stats.macs - settings.start_step * full_step
    cat_macs = settings.start_step * full_step + (settings.steps - settings.start_step) * pruned_step
    return max(1, min(settings.steps, round(cat_macs / full_step)))


def new_session() -> str:
    """An id for one launch of the evaluation: its UTC start time and the main process's pid."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}-{os.getpid()}"


@dataclass(frozen=True)
class Variant:
    """What one row of a table generates: each prompt's image at ``steps`` under ``config``. ``catprune eval``
    makes one per method, ``catprune frontier`` one per step count and grid point."""

    name: str
    """Names the row, its images and its records (``record["method"]``)."""
    steps: int
    config: CATPruningConfig
    generate: Callable[..., Any] | None = field(default=None, compare=False)
    """How it generates, called like :func:`~catprune.runtime.run_generation` (None: that function):
    another solver or one of diffusers' caches (:mod:`catprune.peers`)."""


@dataclass
class ItemContext:
    """What every item of a process shares."""

    pipe: Any
    folder: RunFolder
    prompts: Sequence[str]
    seed: int
    """Image i uses seed + i."""
    guidance_scale: float | None
    alignment: bool
    clip: ClipScorer | None = None
    clip_note: str = ""
    """Why there is no CLIP score though one was asked for; empty otherwise."""
    session: str = UNKNOWN_SESSION
    """The launch's session id (:func:`new_session`), the same in every process."""
    threads: int | None = None
    """torch's CPU threads for the generations (:func:`~catprune.runtime.use_cpu_threads`)."""
    warmed: set[str] = field(default_factory=set)
    """The variants that had their warm-up generation in this process."""


def run_item(context: ItemContext, variant: Variant, index: int) -> dict[str, Any]:
    """Generate and score one image, write it and its record, return the record."""
    prompt, seed = context.prompts[index], context.seed + index
    generation = (variant.generate or run_generation)(
        context.pipe,
        prompt,
        variant.steps,
        seed,
        config=variant.config,
        guidance_scale=context.guidance_scale,
    )
    assert generation.stats is not None
    load, cpus = machine_load()
    image = generation.images[0]
    record: dict[str, Any] = {
        "method": variant.name,
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "steps": variant.steps,
        "macs": generation.stats.macs,
        "seconds": generation.seconds,
        "session": context.session,
        "load": load,
        "cpus": cpus,
        "threads": context.threads,
    }
    if variant.name != REFERENCE:
        record["psnr"], record["ssim"] = fidelity(image, context.folder.read_image(REFERENCE, index))
    if context.alignment:
        record["alignment"] = shapes_alignment(image, prompt)
    if context.clip is not None:
        record["clip_score"] = context.clip(image, prompt)
    context.folder.write_item(record, image)
    return record


def warm_up_variant(context: ItemContext, variant: Variant, index: int) -> None:
    """One short untimed generation of ``variant`` (:func:`~catprune.runtime.warm_up`) before its first
    timed image in this process, so that none of its images is timed with one-off work in it."""
    warm_up(
        context.pipe,
        context.prompts[index],
        variant.steps,
        context.seed + index,
        variant.config,
        context.guidance_scale,
    )
    context.warmed.add(variant.name)


def _partial_state() -> Any:
    """accelerate's process state (one process when not launched), with a day-long barrier timeout: on a
    resumed run one process may have nothing left to do while another works for hours."""
    from accelerate import PartialState

    return PartialState(timeout=timedelta(days=1))


def open_run(
    settings: Any,
    num_prompts: int,
    out: str | Path,
    device: str | None = None,
    clip_model: str | None = None,
    echo: Callable[[str], None] = print,
    threads: int | None = None,
) -> tuple[Any, ItemContext]:
    """Start (or resume) a run into ``out`` in this process: (accelerate's process state, what its items
    share). ``settings`` is a dataclass with ``model``, ``prompts``, ``seed``, ``guidance_scale`` and
    ``dtype``; it is recorded in ``run.json`` with the prompts, and a rerun with other settings is
    refused. ``clip_model``: the resolved CLIP model (:func:`resolve_clip_model`), None for no CLIP score.
    ``threads``: torch's CPU threads (None: :func:`~catprune.runtime.use_cpu_threads`' default, one for a
    small model on the CPU)."""
    process = _partial_state()
    session = [new_session()]  # the main process's id, the same in every process of the launch
    if process.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(session)
    target = torch.device(device) if device is not None else process.device
    folder = RunFolder(out)
    with process.main_process_first():  # the main process downloads a hub set once and sets the folder up
        prompts = load_prompts(settings.prompts, num_prompts, settings.seed)
        if process.is_main_process:
            folder.start(settings, prompts)

    pipe = load_pipeline(settings.model, str(target), settings.dtype)
    used_threads = use_cpu_threads(pipe.transformer, threads)
    clip, why = (None, "")
    if clip_model is not None:
        clip, why = load_clip_scorer(clip_model, target)
    if why and process.is_main_process:
        echo(why)
    context = ItemContext(
        pipe,
        folder,
        prompts,
        settings.seed,
        settings.guidance_scale,
        alignment=str(settings.prompts) in ALIGNED_PROMPT_SETS,
        clip=clip,
        clip_note=why,
        session=session[0],
        threads=used_threads,
    )
    return process, context


def run_items(
    process: Any, context: ItemContext, variants: Sequence[Variant], desc: str, progress: bool = True
) -> list[dict[str, Any]] | None:
    """Generate every (variant, prompt) item of this process's share of the prompts that is not on disk
    yet, wait for the other processes, and on the main process write ``results.jsonl`` and return the
    records of ``variants``, in their order then by prompt (None on the others). ``variants`` starts with
    :data:`REFERENCE`, which the others' fidelity is measured against."""
    if variants[0].name != REFERENCE:
        raise ValueError(f"the first variant must be {REFERENCE!r}, the reference of fidelity")
    folder = context.folder
    with process.split_between_processes(list(range(len(context.prompts)))) as mine:
        # Prompt by prompt, every variant in turn: a change in the machine's load hits all variants alike.
        items = [(variant, index) for index in mine for variant in variants]
        pending = [(variant, index) for variant, index in items if not folder.done(variant.name, index)]
        bar = tqdm(
            total=len(items),
            initial=len(items) - len(pending),
            desc=f"{desc} [process {process.process_index}]",
            position=process.process_index,
            disable=not progress,
        )
        for variant, index in pending:
            if variant.name not in context.warmed:
                warm_up_variant(context, variant, index)
            run_item(context, variant, index)
            bar.update()
        bar.close()

    process.wait_for_everyone()
    if not process.is_main_process:
        return None
    names = [variant.name for variant in variants]
    records = [record for record in folder.records() if record["method"] in names]
    records.sort(key=lambda record: (names.index(record["method"]), record["index"]))
    lines = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(folder.root / "results.jsonl", lambda p: p.write_text(lines))
    return records


def run_evaluation(
    settings: EvalSettings,
    methods: Sequence[Method],
    num_prompts: int,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    threads: int | None = None,
) -> list[dict[str, Any]] | None:
    """Run (or resume) an evaluation into ``out``; returns the summary rows on the main process (None on
    the others) after writing ``results.jsonl``, ``summary.md`` and ``sheet.png`` there. ``threads``:
    torch's CPU threads (:func:`open_run`)."""
    if settings.clip_model is not None and settings.clip_model.strip().lower() in (AUTO_CLIP, "none"):
        settings = replace(
            settings, clip_model=resolve_clip_model(settings.clip_model, settings.model, settings.prompts)
        )
    process, context = open_run(settings, num_prompts, out, device, settings.clip_model, echo, threads)
    fewer = (
        equal_macs_steps(context.pipe, context.prompts[0], settings)
        if any(method.equal_macs for method in methods)
        else 0
    )
    variants = [
        Variant(method.name, fewer if method.equal_macs else settings.steps, settings.pruning_config(method))
        for method in methods
    ]
    records = run_items(process, context, variants, "eval", progress)
    if records is None:
        return None
    rows = summarize(records, [method.name for method in methods])
    markdown = summary_markdown(rows, settings, len(context.prompts), clip_note=context.clip_note)
    atomic_write(context.folder.root / "summary.md", lambda p: p.write_text(markdown))
    sheet = contact_sheet(context.folder, rows, len(context.prompts))
    atomic_write(context.folder.root / "sheet.png", lambda p: sheet.save(p, format="PNG"))
    return rows


# --- the table -----------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def pooled_psnr(psnrs: Sequence[float]) -> float | None:
    """PSNR of the mean squared error over all images, from per-image PSNRs: finite unless every image
    equals its reference (a mean of per-image PSNRs is infinite as soon as one does, which happens when
    both images saturate to the same pixels)."""
    if not psnrs:
        return None
    relative_mse = statistics.fmean(10 ** (-psnr / 10) for psnr in psnrs)
    return -10 * math.log10(relative_mse) if relative_mse > 0 else math.inf


def _timing_conditions(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Under what the records were timed: their sessions (records without one: :data:`UNKNOWN_SESSION`),
    the median load average, the CPU count, and whether the load exceeded the CPUs (``busy``)."""
    loads = [record["load"] for record in records if record.get("load") is not None]
    cpus = [record["cpus"] for record in records if record.get("cpus")]
    load = statistics.median(loads) if loads else None
    cores = statistics.median_low(cpus) if cpus else None
    return {
        "sessions": sorted({str(record.get("session") or UNKNOWN_SESSION) for record in records}),
        "load": load,
        "cpus": cores,
        "busy": load is not None and cores is not None and load > cores,
    }


def timing_outliers(records: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(index, seconds) of the records, all of one row, whose generation took more than
    :data:`OUTLIER_FACTOR` times the row's fastest, slowest first."""
    fastest = min(record["seconds"] for record in records)
    slow = [
        (record["index"], record["seconds"])
        for record in records
        if record["seconds"] > OUTLIER_FACTOR * fastest
    ]
    return sorted(slow, key=lambda item: -item[1])


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method, in ``methods`` order: mean MACs per image, throughput (images per second from
    the median generation time, robust to the first call's warm-up), speed-up over ``full``, and the
    means of the per-image metrics; also the conditions of its timings: ``sessions`` (the sessions its
    records were timed in), ``load`` (median load average), ``cpus``, ``busy`` (load above cpus) and
    ``outliers`` (:func:`timing_outliers`)."""
    rows = []
    for name in methods:
        mine = [record for record in records if record["method"] == name]
        if not mine:
            continue
        alignment = [record["alignment"] for record in mine if "alignment" in record]
        row: dict[str, Any] = {
            "method": name,
            "images": len(mine),
            "steps": sorted({record["steps"] for record in mine}),
            "macs": _mean([record["macs"] for record in mine]),
            "throughput": 1.0 / statistics.median(record["seconds"] for record in mine),
            "psnr": pooled_psnr([record["psnr"] for record in mine if "psnr" in record]),
            "ssim": _mean([record["ssim"] for record in mine if "ssim" in record]),
            "clip_score": _mean([record["clip_score"] for record in mine if "clip_score" in record]),
        }
        for key in ALIGNMENT_KEYS:  # a key a score lacks (textures: background) does not apply to it
            row[f"alignment_{key}"] = _mean([100 * scores[key] for scores in alignment if key in scores])
        row.update(_timing_conditions(mine))
        row["outliers"] = timing_outliers(mine)
        rows.append(row)
    full = next((row for row in rows if row["method"] == REFERENCE), None)
    for row in rows:
        row["speedup"] = row["throughput"] / full["throughput"] if full else None
    return rows


def table_cell(value: float | None, spec: str) -> str:
    """A figure as a table cell: ``-`` when missing, ``inf``, else formatted with ``spec``."""
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


TIMING_MARK = "*"
"""Marks a throughput or speed-up cell whose timings mix sessions or come from a busy machine."""
OUTLIER_MARK = "†"
"""Marks a throughput or speed-up cell whose timings include outliers (:func:`timing_outliers`)."""
BUSY_ROWS_NAMED = 3
"""The most rows a busy-machine note names one by one; beyond, it counts them."""


def _listed(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _busy_note(busy: Sequence[dict[str, Any]], total: int) -> str:
    """Which rows were timed on a busy machine, in one clause (named when few, else counted)."""
    if len(busy) <= BUSY_ROWS_NAMED:
        groups: dict[str, list[str]] = {}  # rows of the same load (as written) share one clause
        for row in busy:
            groups.setdefault(f"{row['load']:.1f} on {row['cpus']} cores", []).append(f"`{row['method']}`")
        return "; ".join(
            f"machine busy (load average {load}) while timing {_listed(names)}"
            for load, names in groups.items()
        )
    loads = [row["load"] for row in busy]
    cores = sorted({row["cpus"] for row in busy})
    low, high = f"{min(loads):.1f}", f"{max(loads):.1f}"
    span = low if low == high else f"{low} to {high}"
    rows = "every row" if len(busy) == total else f"{len(busy)} of the {total} rows"
    return f"machine busy (load average {span} on {'/'.join(map(str, cores))} cores) while timing {rows}"


def _outlier_note(rows: Sequence[dict[str, Any]]) -> str:
    """The one note on timing outliers: how many, the worst, and what they mean."""
    slow = [row for row in rows if row.get("outliers")]
    count = sum(len(row["outliers"]) for row in slow)
    worst = max(slow, key=lambda row: row["outliers"][0][1] * row["throughput"])  # x its row's median
    index, seconds = worst["outliers"][0]
    half = [f"`{row['method']}`" for row in slow if 2 * len(row["outliers"]) >= row["images"]]
    note = (
        f"`{OUTLIER_MARK}` {plural(count, 'image')} of {plural(len(slow), 'row')} took more than "
        f"{OUTLIER_FACTOR:g}x the fastest image of their row (the worst: `{worst['method']}` image {index}, "
        f"{seconds:.2f} s against a median of {1 / worst['throughput']:.2f} s): the machine stalled, as "
        "every image of a row runs the same steps. "
    )
    if half:
        return note + (
            f"In {', '.join(half)} half or more of the images stalled, so the median is one of them: those "
            "figures are not a measurement; rerun into a fresh `--out` with `--threads 1` on an idle machine."
        )
    return note + "The medians are those of the other images: read the marked figures with care."


def timing_notes(rows: Sequence[dict[str, Any]]) -> tuple[Callable[[dict[str, Any], str], str], list[str]]:
    """(the marks of a row's throughput or speed-up cell, the notes that say why, each once). Timings
    from several sessions (a resumed run, or methods added to a finished one) mark every cell; a busy
    machine marks the throughput and speed-up of the method timed on it, and every speed-up if that
    method is ``full``, their reference; timing outliers (:func:`timing_outliers`) mark their row's cells
    and, in ``full``, every speed-up."""
    sessions = sorted({session for row in rows for session in row.get("sessions", ())})
    mixed = len(sessions) > 1
    busy = [row for row in rows if row.get("busy")]
    full_busy = any(row["method"] == REFERENCE for row in busy)
    full_outliers = any(row.get("outliers") for row in rows if row["method"] == REFERENCE)

    def marks(row: dict[str, Any], key: str) -> str:
        if row.get(key) is None:
            return ""
        star = mixed or bool(row.get("busy")) or (key == "speedup" and full_busy)
        dagger = bool(row.get("outliers")) or (key == "speedup" and full_outliers)
        return (TIMING_MARK if star else "") + (OUTLIER_MARK if dagger else "")

    notes = []
    if mixed:
        older = " (some by a version that did not record sessions)" if UNKNOWN_SESSION in sessions else ""
        notes.append(
            f"`{TIMING_MARK}` Throughput and speed-up mix timings from {len(sessions)} sessions{older}: "
            "the run was resumed or extended, so its images were timed at different times, possibly under "
            "other loads, and the figures are not a measurement. To measure them, run the same command into "
            "a fresh `--out` on an idle machine."
        )
    if busy:
        notes.append(
            f"`{TIMING_MARK}` Throughput and speed-up timed on a busy machine: "
            f"{_busy_note(busy, len(rows))}. The marked figures are not a measurement; to measure them, run "
            "the same command into a fresh `--out` on an idle machine."
        )
    if any(row.get("outliers") for row in rows):
        notes.append(_outlier_note(rows))
    return marks, notes


Column = tuple[str, Callable[[dict[str, Any]], str]]
"""A column of a markdown table: its header and how it writes a row's cell."""
MACS_COLUMN: Column = ("MACs", lambda r: format_count(r["macs"], digits=4))
FIDELITY_COLUMNS: list[Column] = [
    ("PSNR (dB)", lambda r: table_cell(r["psnr"], ".2f")),
    ("SSIM", lambda r: table_cell(r["ssim"], ".4f")),
]
IMAGES_COLUMN: Column = ("Images", lambda r: str(r["images"]))


def timing_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[Column], list[str]]:
    """The throughput and speed-up columns of :func:`summarize`'s rows, and notes: cells timed across
    sessions or on a busy machine end in :data:`TIMING_MARK`, those with outliers in :data:`OUTLIER_MARK`,
    and a note says why (:func:`timing_notes`)."""
    mark, notes = timing_notes(rows)

    columns: list[Column] = [
        ("Throughput (img/s)", lambda r: table_cell(r["throughput"], ".3f") + mark(r, "throughput")),
        (
            "Speed-up",
            lambda r: (
                table_cell(r["speedup"], ".2f")
                + ("x" if r["speedup"] is not None else "")
                + mark(r, "speedup")
            ),
        ),
    ]
    return columns, notes


def alignment_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[Column], list[str]]:
    """The shapes checker's columns and the note that defines them, where it scored the rows; else none."""
    if all(row["alignment_full"] is None for row in rows):
        return [], []
    columns: list[Column] = [
        ("Alignment (%)", lambda r: table_cell(r["alignment_full"], ".1f")),
        (
            "Attributes (%)",
            lambda r: table_cell(
                _mean([r[f"alignment_{key}"] for key in ("colour", "shape", "size", "position")]), ".1f"
            ),
        ),
    ]
    note = (
        "Alignment: images the shapes checker finds right in every respect; Attributes: mean of its "
        "colour, shape, size and position scores."
    )
    if any(row["alignment_full"] is not None and row["alignment_background"] is None for row in rows):
        note += " On textured backdrops the checker reads the objects only: the background is not scored."
    return columns, [note]


def markdown_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """A markdown table of ``rows``, then its notes, one per line."""
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(render(row) for _, render in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body, "", *notes]) + "\n"


def summary_markdown(
    rows: Sequence[dict[str, Any]], settings: EvalSettings, num_prompts: int, clip_note: str = ""
) -> str:
    """The paper's Table 2/3 layout (MACs, throughput, speed-up, CLIP score) plus alignment and fidelity,
    throughput and speed-up marked where they are not a measurement (:func:`timing_columns`)."""
    timing, why_marked = timing_columns(rows)
    alignment, alignment_notes = alignment_columns(rows)
    columns: list[Column] = [
        ("Method", lambda r: f"{r['method']} - {'/'.join(map(str, r['steps']))} steps"),
        MACS_COLUMN,
        *timing,
    ]
    if any(row["clip_score"] is not None for row in rows):
        columns.append(("CLIP score", lambda r: table_cell(r["clip_score"], ".2f")))
    columns += [*alignment, *FIDELITY_COLUMNS, IMAGES_COLUMN]
    notes = [
        f"Model `{settings.model}`, prompts `{settings.prompts}` ({num_prompts}), {settings.steps} steps, "
        f"alpha {settings.keep_ratio}, t0 {settings.start_step}, seed {settings.seed} + prompt index.",
        "MACs: transformer multiply-accumulates per image (all CFG rows), from the layer shapes. Throughput: "
        "images per second (median generation). PSNR (of the mean squared error over all images) and SSIM "
        "(mean): against `full` from the same seed.",
        *alignment_notes,
    ]
    if clip_note:
        notes.append(clip_note)
    return markdown_table(columns, rows, [*notes, *why_marked])


# --- the contact sheet ---------------------------------------------------------------------------------


SHEET_PROMPTS = 8
"""The most prompts (rows) :func:`contact_sheet` shows."""
SHEET_MIN_CELL, SHEET_MAX_CELL = 128, 256
"""A contact sheet's image sides in pixels: smaller images are enlarged by a whole factor to reach the
least, larger ones shrunk to the most (a real model's 1024-pixel images)."""
SHEET_GAP, SHEET_HEADER, SHEET_LABEL = 4, 32, 40
"""Pixels between cells, of the header row (method names, PSNR) and of the prompt-index column."""


def contact_sheet(
    folder: RunFolder, rows: Sequence[dict[str, Any]], num_prompts: int, max_prompts: int = SHEET_PROMPTS
) -> Image.Image:
    """The images side by side, to see what the table's figures mean: one row per prompt (the first
    ``max_prompts`` of ``num_prompts`` that every method of ``rows``, :func:`summarize`'s, has finished),
    one column per method in the rows' order, headed by its name and pooled PSNR against ``full``. Cells
    are enlarged by a whole factor with nearest neighbour (the toy images are 32 or 64 pixels), so every
    pixel stays a crisp square, or shrunk to ``SHEET_MAX_CELL``; a cell is ``SHEET_GAP`` pixels wider
    and taller than its image."""
    methods = [row["method"] for row in rows]
    indices = [i for i in range(num_prompts) if all(folder.done(m, i) for m in methods)][:max_prompts]
    # Every image of a run has the pipeline's size.
    cells = {(m, i): Image.fromarray(folder.read_image(m, i)) for i in indices for m in methods}
    width, height = next(iter(cells.values())).size if cells else (SHEET_MIN_CELL, SHEET_MIN_CELL)
    scale = max(1, math.ceil(SHEET_MIN_CELL / min(width, height)))
    size = (width * scale, height * scale)
    if max(width, height) > SHEET_MAX_CELL:
        shrink = SHEET_MAX_CELL / max(width, height)
        size = (round(width * shrink), round(height * shrink))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    cell_w, cell_h = size[0] + SHEET_GAP, size[1] + SHEET_GAP
    sheet = Image.new(
        "RGB", (SHEET_LABEL + len(methods) * cell_w, SHEET_HEADER + len(indices) * cell_h), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for column, row in enumerate(rows):
        psnr_line = f"\n{table_cell(row['psnr'], '.1f')} dB" if row.get("psnr") is not None else ""
        draw.text((SHEET_LABEL + column * cell_w, 2), row["method"] + psnr_line, fill="black")
    for line, index in enumerate(indices):
        top = SHEET_HEADER + line * cell_h
        draw.text((4, top + cell_h // 2 - 6), str(index), fill="black")
        for column, method in enumerate(methods):
            image = cells[method, index].resize(size, resample)
            sheet.paste(image, (SHEET_LABEL + column * cell_w, top))
    return sheet
