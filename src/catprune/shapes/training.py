"""Train the shapes models (CPU, or a GPU when there is one): resumable, weight EMA, warm-up + cosine LR.

Objectives follow the models' namesakes:

- ``mmdit`` (SD3): rectified flow. ``x_s = (1 - s) x0 + s n`` with s drawn logit-normal (SD3's
  default) and shifted like the sampler's timesteps (textures: by 3; shapes: not at all), the
  transformer predicts the velocity ``n - x0`` at timestep ``1000 s``.
- ``pixart`` (PixArt-Sigma): DDPM with the linear beta schedule (1e-4 to 0.02, 1000 steps), epsilon
  prediction with a weighted MSE (``epsilon_loss_weight``). In pixel space an image's layout is decided at
  high noise (SNR 0.02-1), where the image estimate amplifies an epsilon error 1/sqrt(SNR) times: with
  plain or min-SNR weighting those steps were learned far more slowly than by the rectified-flow model
  (twice its image-estimate error at SNR 0.03-0.14 after the same training), and objects landed in the
  wrong place. The weight is min-SNR-5 (Hang et al. 2023) at low noise and truncated SNR (Salimans & Ho
  2022: a uniform image-estimate loss) at high noise, capped at 50. The second half of the output is
  improved-DDPM's learned variance: it interpolates the log variance between beta_t and the posterior's
  and is trained by the variational-bound term (KL to the true posterior, in bits) with weight 0.001 and
  the mean detached, so it does not disturb the noise prediction. DPM-Solver++ (the sampler) ignores
  it, as in PixArt-Sigma.

The data set (``data``) is part of the settings: ``shapes`` (32x32, ``scenes``) or ``textures`` (64x64,
``textures``: a 32x32 token grid, SD3's at 512x512, sampled with SD3's timestep shift of 3). The text
encoder's vocabulary is the data set's, so a saved pipeline knows its own grammar.

Both drop the caption (empty prompt) 10% of the time for classifier-free guidance. Data are drawn
fresh every step from the procedural training split, seeded by the step number, so a resumed run
sees exactly the batches it would have seen.

The learning-rate schedule runs over the run's budget: its step count, or its wall time with
``minutes`` (then a run is reproducible in its settings but not bit-for-bit). Checkpoints hold the
weights, their EMA and the optimizer state as safetensors, and the counters as JSON. The device and
the number of data-loading workers change only the speed, so they are not part of the saved settings.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .pipelines import ShapesMMDiTPipeline, ShapesPipeline, ShapesPixArtPipeline
from .text import ShapesTextEncoder
from .train_config import ARCHES as ARCHES
from .train_config import DATASETS, HEAD_DIM, TrainConfig
from .train_config import Arch as Arch
from .train_config import DataSet as DataSet

PATCH_SIZE = 2
MATH_ATTENTION_MAX_TOKENS = 256
VLB_WEIGHT = 0.001
MIN_SNR_GAMMA = 5.0
HIGH_NOISE_WEIGHT_CAP = 50.0
CAPTION_DROP = 0.1


Batch = tuple[torch.Tensor, list[str], torch.Generator, torch.Tensor | None]
"""A step's images in [-1, 1], its captions (some dropped), the generator of its noise and its per-pixel
loss weights (B, 1, size, size) (None: unweighted)."""


def build_pipeline(config: TrainConfig) -> ShapesPipeline:
    """A freshly initialised pipeline for the data set's pixels with patch 2 (shapes: a 16x16 token grid)."""
    torch.manual_seed(config.seed)
    data = DATASETS[config.data]
    heads = config.width // HEAD_DIM
    text_encoder = ShapesTextEncoder(
        vocabulary=data.vocabulary,
        dim=config.width,
        num_layers=config.text_layers,
        num_heads=heads,
        pooled_dim=config.width,
    )
    if config.arch == "mmdit":
        transformer = SD3Transformer2DModel(
            sample_size=data.image_size,
            patch_size=PATCH_SIZE,
            in_channels=3,
            out_channels=3,
            num_layers=config.layers,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=heads,
            joint_attention_dim=config.width,
            caption_projection_dim=config.width,
            pooled_projection_dim=config.width,
            pos_embed_max_size=data.image_size // PATCH_SIZE,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=data.flow_shift)
        return ShapesMMDiTPipeline(transformer, scheduler, text_encoder)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=HEAD_DIM,
        in_channels=3,
        out_channels=6,
        num_layers=config.layers,
        cross_attention_dim=config.width,
        caption_channels=config.width,
        sample_size=data.image_size,
        patch_size=PATCH_SIZE,
        use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon"
    )
    return ShapesPixArtPipeline(transformer, scheduler, text_encoder)


def trainable_modules(pipe: ShapesPipeline) -> dict[str, torch.nn.Module]:
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}


def named_parameters(pipe: ShapesPipeline) -> dict[str, torch.nn.Parameter]:
    return {
        f"{prefix}.{name}": p
        for prefix, module in trainable_modules(pipe).items()
        for name, p in module.named_parameters()
    }


def batch(config: TrainConfig, step: int) -> Batch:
    """Images in [-1, 1] (B, 3, size, size), captions with 10% dropped, the step's noise generator and
    the pixel weights of ``config.object_weight``."""
    seed = config.seed * 1_000_003 + step
    data = DATASETS[config.data]
    images, captions = data.make_dataset(config.batch_size, seed, "train", data.image_size)
    generator = torch.Generator().manual_seed(seed)
    drop = torch.rand(len(captions), generator=generator) < CAPTION_DROP
    captions = ["" if d else c for d, c in zip(drop.tolist(), captions, strict=True)]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    weight = None
    if config.object_weight is not None:
        masks = torch.from_numpy(data.object_masks(config.batch_size, seed, "train", data.image_size))
        weight = 1 + (config.object_weight - 1) * masks[:, None].float()  # (B, 1, size, size)
        weight = weight / weight.mean(dim=(2, 3), keepdim=True)  # (B, 1, size, size), mean 1 per image
    return pixels, captions, generator, weight


def _as_drawn(item: Batch) -> Batch:
    """The loader's collate function: each item already is a whole batch."""
    return item


class _StepBatches(Dataset):
    """Item ``step`` is that step's batch, so worker processes can draw batches ahead of the model."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> Batch:
        return batch(self.config, step)


def batches(config: TrainConfig, first_step: int, workers: int) -> Iterator[Batch]:
    """Batches of steps ``first_step, first_step + 1, ...``, drawn by ``workers`` processes (0: inline)."""
    if workers == 0:
        step = first_step
        while True:
            yield batch(config, step)
            step += 1
    loader = DataLoader(
        _StepBatches(config),
        batch_size=None,
        sampler=range(first_step, len(_StepBatches(config))),
        num_workers=workers,
        collate_fn=_as_drawn,
        prefetch_factor=4,
        persistent_workers=False,
    )
    yield from loader


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's timestep shift applied to training noise levels too (as SD3 does at high
    resolution), so that training covers the noise levels sampling spends its steps on."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, C, H, W) ``values`` with per-pixel weights (B, 1, H, W) of mean 1 (None: plain mean)."""
    return values.mean() if weight is None else (values * weight).mean()


def flow_loss(
    pipe: ShapesPipeline,
    x0: torch.Tensor,
    captions: list[str],
    gen: torch.Generator,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    sigma = shift_sigmas(torch.sigmoid(torch.randn(len(x0), generator=gen)), pipe.scheduler.config.shift)
    sigma = sigma.to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    text = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    velocity = pipe.model_output((1 - s) * x0 + s * noise, sigma * 1000, text)
    return weighted_mean((velocity - (noise - x0)) ** 2, weight)


def _normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1
    )


def epsilon_loss_weight(snr: torch.Tensor) -> torch.Tensor:
    """Weight of the epsilon MSE at signal-to-noise ratio ``snr``: ``min(SNR, 5) / SNR`` above SNR 1,
    ``min(1 / SNR, 50)`` below (there the image estimate's error is weighted uniformly, up to the cap)."""
    return torch.where(
        snr >= 1, snr.clamp(max=MIN_SNR_GAMMA) / snr, snr.reciprocal().clamp(max=HIGH_NOISE_WEIGHT_CAP)
    )


def ddpm_loss(
    pipe: ShapesPipeline,
    x0: torch.Tensor,
    captions: list[str],
    gen: torch.Generator,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    scheduler = pipe.scheduler
    betas = scheduler.betas.float()
    abar = scheduler.alphas_cumprod.float()
    t = torch.randint(0, len(betas), (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return values[t].view(-1, 1, 1, 1).to(x0.device)

    abar_t = per_sample(abar)
    abar_prev = per_sample(torch.cat([abar.new_ones(1), abar[:-1]]))
    beta_t = per_sample(betas)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
    text = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    output = pipe.model_output(x_t, t.to(x0.device), text)
    eps, var_signal = output.chunk(2, dim=1)
    snr = abar_t / (1 - abar_t)
    mse = weighted_mean(epsilon_loss_weight(snr) * (eps - noise) ** 2, weight)

    posterior_var = betas * (1 - torch.cat([abar.new_ones(1), abar[:-1]])) / (1 - abar)
    log_posterior = per_sample(torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])))
    coef_x0 = beta_t * abar_prev.sqrt() / (1 - abar_t)
    coef_xt = (1 - abar_prev) * (1 - beta_t).sqrt() / (1 - abar_t)
    x0_pred = (x_t - (1 - abar_t).sqrt() * eps.detach()) / abar_t.sqrt()
    frac = (var_signal + 1) / 2
    model_logvar = frac * torch.log(beta_t) + (1 - frac) * log_posterior
    kl = _normal_kl(
        coef_x0 * x0 + coef_xt * x_t, log_posterior, coef_x0 * x0_pred + coef_xt * x_t, model_logvar
    )
    return mse + VLB_WEIGHT * kl.mean() / math.log(2.0)


LOSSES = {"mmdit": flow_loss, "pixart": ddpm_loss}


class Trainer:
    """One run in ``out_dir``: resumes from ``out_dir/checkpoint`` when it holds one.

    ``data_workers`` processes draw the batches ahead of the model (0: in the training loop), which
    matters on a GPU, where drawing a batch of scenes takes longer than a training step.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        checkpoint_every: int = 200,
        device: str | torch.device = "cpu",
        data_workers: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.data_workers = data_workers
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.checkpoint_every = checkpoint_every
        state_file = self.checkpoint_dir / "state.json"
        self.step, self.elapsed = 0, 0.0
        if state_file.is_file():
            saved = json.loads(state_file.read_text())
            config = self._merge(TrainConfig(**saved["config"]), config)
            self.step, self.elapsed = saved["step"], saved["elapsed_seconds"]
        self.config = config
        self.pipe = build_pipeline(config).to(self.device)
        self.params = named_parameters(self.pipe)
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        self.optimizer = torch.optim.AdamW(
            self.params.values(),
            lr=config.lr,
            betas=(0.9, 0.99),
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        if self.step:
            self._load_checkpoint(saved["param_groups"])

    @staticmethod
    def _merge(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
        """A resumed run keeps its saved model and optimisation settings; only the budget can change,
        and the object weight when one is given (a run may start weighting objects late)."""
        changes: dict[str, object] = {"steps": given.steps, "minutes": given.minutes}
        if given.object_weight is not None:
            changes["object_weight"] = given.object_weight
            if saved.object_weight != given.object_weight:
                print(f"resuming: object_weight {saved.object_weight!r} -> {given.object_weight!r}")
        for field in fields(TrainConfig):
            if field.name not in changes and getattr(saved, field.name) != getattr(given, field.name):
                print(f"resuming: keeping the checkpoint's {field.name}={getattr(saved, field.name)!r}")
        return TrainConfig(**{**asdict(saved), **changes})

    def progress(self) -> float:
        """Share of the budget used, which drives the learning-rate schedule and the end of the run."""
        if self.config.steps is not None:
            return self.step / self.config.steps
        return self.elapsed / (60 * self.config.minutes)

    def learning_rate(self) -> float:
        warmup = min(1.0, (self.step + 1) / self.config.warmup_steps)
        return self.config.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress())))

    def train_step(self, data: Batch) -> torch.Tensor:
        """One optimisation step on ``data`` (the step's batch); returns the loss without reading it,
        so that a GPU is not waited for."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        x0, captions, generator, weight = data
        # On a CPU the math attention kernel is faster than the flash kernel on 16x16 token grids, and
        # 2.5 times slower on 32x32 ones (measured at width 128, one thread).
        grid = DATASETS[self.config.data].image_size // PATCH_SIZE
        small = self.device.type == "cpu" and grid**2 <= MATH_ATTENTION_MAX_TOKENS
        attention = sdpa_kernel(SDPBackend.MATH) if small else nullcontext()
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.config.bf16)
        with autocast, attention:
            weight = None if weight is None else weight.to(self.device)
            loss = LOSSES[self.config.arch](self.pipe, x0.to(self.device), captions, generator, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
        self.optimizer.step()
        self.step += 1
        # Warm the EMA up so that early checkpoints are usable (decay grows to ema_decay).
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.values()), list(self.params.values()), 1 - decay)
        return loss.detach()

    def run(self) -> ShapesPipeline:
        """Train until the budget is used, checkpointing periodically; returns the EMA pipeline."""
        self.pipe.transformer.train()
        self.pipe.text_encoder.train()
        bar = tqdm(
            initial=self.step, desc=f"train {self.config.arch}", unit="step", mininterval=5, total=None
        )
        if self.config.steps is not None:
            bar.total = self.config.steps
        data = batches(self.config, self.step, self.data_workers)
        losses: list[torch.Tensor] = []
        try:
            start = time.perf_counter()
            while self.progress() < 1.0:
                losses.append(self.train_step(next(data)))
                bar.update(1)
                # Read the losses (and the clock) every 10 steps: reading waits for the device.
                if self.step % 10 == 0 or self.step % self.checkpoint_every == 0:
                    loss = torch.stack(losses).mean().item()
                    losses.clear()
                    now = time.perf_counter()
                    self.elapsed += now - start
                    start = now
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{self.learning_rate():.2e}", done=f"{self.progress():.1%}"
                    )
                if self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                    start = time.perf_counter()
        finally:
            bar.close()
        self.save_checkpoint()
        return self.ema_pipeline()

    def ema_pipeline(self) -> ShapesPipeline:
        pipe = build_pipeline(self.config)
        with torch.no_grad():
            for name, p in named_parameters(pipe).items():
                p.copy_(self.ema[name])
        pipe.transformer.eval()
        pipe.text_encoder.eval()
        return pipe

    def save_checkpoint(self) -> None:
        """Weights, EMA, optimizer moments (safetensors) and counters (JSON), each replaced atomically;
        the EMA pipeline is saved too so that a run in progress can be sampled."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        optimizer_state = self.optimizer.state_dict()
        names = list(self.params)
        tensors = {
            f"{names[index]}::{key}": value
            for index, state in optimizer_state["state"].items()
            for key, value in state.items()
        }
        files = {
            "model.safetensors": {name: p.detach().cpu() for name, p in self.params.items()},
            "ema.safetensors": {name: p.cpu() for name, p in self.ema.items()},
            "optimizer.safetensors": {
                k: (v.reshape(-1) if v.dim() == 0 else v).cpu() for k, v in tensors.items()
            },
        }
        for filename, content in files.items():
            _atomic(self.checkpoint_dir / filename, lambda path, c=content: save_file(c, str(path)))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer_state["param_groups"]]
        state = {
            "config": asdict(self.config),
            "step": self.step,
            "elapsed_seconds": self.elapsed,
            "param_groups": groups,
        }
        _atomic(self.checkpoint_dir / "state.json", lambda path: path.write_text(json.dumps(state, indent=2)))
        self.ema_pipeline().save_pretrained(self.out_dir / "pipeline", safe_serialization=True)

    def _load_checkpoint(self, param_groups: list[dict]) -> None:
        weights = load_file(str(self.checkpoint_dir / "model.safetensors"))
        ema = load_file(str(self.checkpoint_dir / "ema.safetensors"))
        moments = load_file(str(self.checkpoint_dir / "optimizer.safetensors"))
        names = list(self.params)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights[name])
                self.ema[name].copy_(ema[name])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            name, field = key.split("::")
            state.setdefault(names.index(name), {})[field] = value.reshape(()) if field == "step" else value
        groups = [{**g, "params": list(range(len(names)))} for g in param_groups]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _atomic(path: Path, write: object) -> None:
    """Write through a temporary file so that an interruption never leaves a half-written checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)  # type: ignore[operator]
    os.replace(temporary, path)
