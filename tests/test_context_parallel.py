"""CAT pruning under diffusers' context parallelism (Ulysses), on the CPU: two processes under a real
``torchrun --nproc_per_node 2`` (gloo) run a tiny Wan and a tiny Flux transformer
(``context_parallel_worker.py``) and each checks itself against the same models in one process.

What it aims at: the gather of each process's share of the selected tokens where diffusers would split the
image tokens (Wan: the first block's input, the rotary table; Flux: the packed latents and their ids, with
the text still split), the all-to-all of Q, K, V into head-sharded caches at fill and pruned steps, the
all-gather at the output and the scatter, Wan's two passes per step, K rounded to a multiple of the
processes; and what is refused: ring attention, parallelism enabled after pruning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_sd3, tiny_wan

from catprune import parallelism
from catprune.cli import main
from catprune.engine import Grid, StepContext, StepMode, TokenLayout
from catprune.engine.context import RowLayout, TokenShard
from catprune.errors import UserError

TESTS = Path(__file__).parent
PROCESSES = 2


def torchrun(*arguments: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGUMENTS`` with this checkout's sources first."""
    source = str(TESTS.parent / "src")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
    result = subprocess.run(
        [*command, *arguments], cwd=TESTS, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two processes measured (see ``context_parallel_worker.py``)."""
    out = tmp_path_factory.mktemp("context-parallel")
    torchrun(str(TESTS / "context_parallel_worker.py"), str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)]


MODELS = ("wan", "wan-ti2v", "flux", "wan-bfloat16-cache")
"""Wan 2.1; Wan 2.2 TI2V's per-token timesteps (split by the plan, gathered per process when pruned); Flux;
Wan 2.1 with its K/V caches stored in bfloat16 (``cache_dtype``), head-sharded the same way."""


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_keep_ratio_one_equals_the_unpatched_single_process_model(
    measured: list[dict[str, Any]], model: str
) -> None:
    for rank in measured:
        result = rank[model]
        assert "pruned" in result["keep_all_modes"] and "fill" in result["keep_all_modes"]
        assert result["keep_all_vs_unpatched"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_pruned_equals_the_pruned_single_process_model(measured: list[dict[str, Any]], model: str) -> None:
    """Over full, fill and pruned steps (Wan: two passes each), with the same selection (K, MACs) as one
    process; pruning changes the output, so the match is not the unpatched model's."""
    for rank in measured:
        result = rank[model]
        assert result["parallel_modes"] == result["single_modes"]
        assert {"full", "fill", "pruned"} <= set(result["parallel_modes"])
        assert result["parallel_stats"] == result["single_stats"]
        assert result["pruned_vs_single_pruned"] <= 1e-5
        assert result["pruned_vs_unpatched"] > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_each_process_recomputes_half_the_tokens_and_caches_half_the_heads(
    measured: list[dict[str, Any]], model: str
) -> None:
    for rank in measured:
        result = rank[model]
        assert result["parallel_kept"] == result["single_kept"] and result["parallel_kept"] % PROCESSES == 0
        assert result["parallel_local_kept"] == result["parallel_kept"] // PROCESSES
        # The same rows and tokens, half the heads: (B, L, H / 2, d) against (B, L, H, d).
        for (*shape, heads, width), (*single_shape, single_heads, single_width) in zip(
            result["parallel_cache_shapes"], result["single_cache_shapes"], strict=True
        ):
            assert (shape, heads * PROCESSES, width) == (single_shape, single_heads, single_width)
        assert result["parallel_cache_bytes"] * PROCESSES == result["single_cache_bytes"]


@pytest.mark.slow
def test_a_bfloat16_cache_halves_each_processs_cache_again(measured: list[dict[str, Any]]) -> None:
    for rank in measured:
        assert rank["wan-bfloat16-cache"]["parallel_cache_bytes"] * 2 == rank["wan"]["parallel_cache_bytes"]


@pytest.mark.slow
def test_flux_rounds_the_kept_tokens_up_to_a_multiple_of_the_processes(
    measured: list[dict[str, Any]],
) -> None:
    assert measured[0]["flux"]["parallel_kept"] == 12  # round(0.3 * 36) = 11, shared by two processes


@pytest.mark.slow
def test_ring_attention_and_parallelism_enabled_after_pruning_are_refused(
    measured: list[dict[str, Any]],
) -> None:
    for rank in measured:
        assert "does not support ring attention" in rank["ring"] and "ulysses_degree" in rank["ring"]
        assert "enabled on this WanTransformer3DModel after apply_cat_pruning" in rank["enabled_after"]


def pruned_context(shard: TokenShard | None, fixed_tokens: int = 0) -> StepContext:
    """A pruned step on a 2 x 4 grid, K = 4 of its 8 tokens in each of two rows."""
    indices = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    return StepContext(
        step=3,
        pass_key=(None, 0),
        first_pass=True,
        mode=StepMode.PRUNED,
        rows=2,
        row_layout=RowLayout(),
        layout=TokenLayout(Grid(2, 4), fixed_tokens),
        num_kept=4,
        text_tokens=6,
        indices=indices,
        shard=shard,
    )


def test_each_process_gathers_its_contiguous_share_of_the_selected_tokens() -> None:
    tokens = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1)  # (B, lead 1 + N 8, 1)
    whole = pruned_context(None).gather(tokens, lead=1)
    shares = [pruned_context(TokenShard(rank, 2, splits_text=True)).gather(tokens, lead=1) for rank in (0, 1)]
    assert [share.shape for share in shares] == [(2, 3, 1)] * 2  # the lead row, then K / 2 tokens
    assert torch.equal(torch.cat([shares[0][:, 1:], shares[1][:, 1:]], dim=1), whole[:, 1:])
    assert pruned_context(TokenShard(1, 2, splits_text=True)).local_text_tokens == 3
    assert pruned_context(TokenShard(1, 2)).local_text_tokens == 6


def test_kept_tokens_round_up_to_the_processes_within_the_grid() -> None:
    shard = TokenShard(0, 4)
    assert [shard.kept(kept, 16) for kept in (1, 4, 5, 15, 16)] == [4, 4, 8, 16, 16]


def test_fixed_tokens_are_refused_under_context_parallelism() -> None:
    pruned_context(None, fixed_tokens=2)
    with pytest.raises(ValueError, match="never pruned"):
        pruned_context(TokenShard(0, 2), fixed_tokens=2)


@pytest.mark.slow
def test_bench_runs_under_torchrun_with_context_parallelism(tmp_path: Path) -> None:
    tiny_wan().save_config(tmp_path)
    result = torchrun(
        "-m", "catprune", "bench", "--model", str(tmp_path), "--random-weights", "--resolution", "64",
        "--steps", "5", "--start-step", "2", "--repeats", "1", "--device", "cpu",
        "--context-parallel", "ulysses", "--json",
    )  # fmt: skip
    fields = json.loads(result.stdout[result.stdout.index("{") :])  # one report: the first process's
    assert fields["context_parallel"] == PROCESSES and fields["pruned_steps"] == 3
    assert (fields["image_tokens"], fields["kept_tokens"]) == (21 * 4 * 4, 102)  # round(0.3 * 336) = 101
    # Per process: 2 passes (CFG as two calls) x 2 blocks' K and V of 1 row, 336 tokens, 1 of the 2 heads of
    # 12 channels, float32.
    assert fields["cfg_calls"] == 2 and fields["kv_cache_bytes"] == 2 * 2 * 2 * 336 * 1 * 12 * 4


def test_context_parallel_outside_torchrun_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompt = "a large red circle at the top left on a white background"
    assert main(["generate", prompt, "--context-parallel", "ulysses", "--out", str(tmp_path / "x.png")]) == 2
    assert "under torchrun: torchrun --nproc_per_node P" in capsys.readouterr().err


def test_a_model_without_a_context_parallel_plan_is_refused() -> None:
    with pytest.raises(UserError, match=r"no context-parallel plan .* for SD3Transformer2DModel"):
        parallelism.enable(tiny_sd3())
