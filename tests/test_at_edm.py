"""AT-EDM's baseline: weighted PageRank over an attention map, and the mechanism's attention capture."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import (
    pixart_pipeline,
    pixart_prompts,
    sd3_pipeline,
    sd3_prompts,
    seeded_latents,
    tiny_pixart,
    tiny_sd3,
)

from catprune import CATPruningConfig, apply_cat_pruning, remove_cat_pruning
from catprune.adapters.attention import CachedSelfAttentionProcessor
from catprune.engine import StepMode
from catprune.selection import Grid
from catprune.strategies import ATTENTION_STRATEGIES, SelectionInput, get_strategy, weighted_pagerank

CASES = {
    "sd3": (lambda: sd3_pipeline(tiny_sd3()), sd3_prompts, {}, 7),
    "pixart": (lambda: pixart_pipeline(tiny_pixart()), pixart_prompts, {"use_resolution_binning": False}, 0),
}


def test_pagerank_ranks_the_tokens_everyone_attends_to_first() -> None:
    # Everyone attends most to token 2, and token 2 (the important one) to token 0 more than to the rest.
    attention = torch.tensor(
        [[[0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.7, 0.1], [0.4, 0.1, 0.3, 0.2], [0.1, 0.1, 0.7, 0.1]]]
    )
    scores = weighted_pagerank(attention)
    assert scores.shape == (1, 4)
    assert torch.allclose(scores.sum(), torch.tensor(1.0))
    assert scores[0].argsort(descending=True).tolist() == [2, 0, 3, 1]


def test_pagerank_treats_prompts_independently() -> None:
    attention = torch.softmax(torch.randn(3, 10, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    batched = weighted_pagerank(attention)
    for row in range(3):
        assert torch.allclose(batched[row], weighted_pagerank(attention[row : row + 1])[0])


def selection_input(attention: torch.Tensor | None, counts: torch.Tensor, num_kept: int) -> SelectionInput:
    prompts, tokens = counts.shape
    noise = torch.zeros(prompts, tokens, 4)
    config = CATPruningConfig(strategy="at-edm")
    scores = torch.zeros(prompts, tokens)
    return SelectionInput(
        noise, noise, scores, counts, 1, Grid(1, tokens), num_kept, config, attention=attention
    )


def test_at_edm_keeps_the_most_important_image_tokens_and_ignores_text_nodes() -> None:
    # Nodes 0-3 are image tokens, node 4 a text token that attracts the most attention.
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, 5.0])
    attention = torch.softmax(logits.expand(1, 5, 5), dim=-1)
    chosen = get_strategy("at-edm")(selection_input(attention, torch.zeros(1, 4), 2))
    assert chosen.tolist() == [[1, 3]]


def test_at_edm_without_a_map_falls_back_to_the_stalest_tokens() -> None:
    counts = torch.tensor([[0.5, 0.0, 1.0, 0.25]])
    assert get_strategy("at-edm")(selection_input(None, counts, 2)).tolist() == [[1, 3]]
    assert "at-edm" in ATTENTION_STRATEGIES and "cat" not in ATTENTION_STRATEGIES


def run_recording(case: str, strategy: str, steps: int = 6) -> tuple[Any, list[dict[str, Any]], torch.Tensor]:
    """Generate two prompts with ``strategy`` and record, per transformer call, its mode, indices and the
    attention map left after it."""
    make, prompts, extra, _ = CASES[case]
    pipe = make()
    state = apply_cat_pruning(pipe, CATPruningConfig(strategy=strategy, start_step=3))
    calls: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls.append(
            {
                "mode": state.mode,
                "indices": None if state.indices is None else state.indices.clone(),
                "map": None if state.slot.capture.map is None else state.slot.capture.map.clone(),
            }
        )

    pipe.transformer.register_forward_hook(hook)
    images = pipe(
        **prompts(2),
        height=128,
        width=128,
        num_inference_steps=steps,
        latents=seeded_latents(2),
        output_type="latent",
        **extra,
    ).images
    return pipe, calls, images


@pytest.mark.parametrize("case", list(CASES))
def test_one_block_captures_a_row_stochastic_map_over_image_and_text_tokens(case: str) -> None:
    pipe, calls, _ = run_recording(case, "at-edm")
    state = pipe.transformer._catprune_engine
    capturing = [p for p in state.processors if getattr(p, "capture_attention", False)]
    assert len(capturing) == 1 and isinstance(capturing[0], CachedSelfAttentionProcessor)
    text = CASES[case][3]
    maps = [call["map"] for call in calls if call["mode"] is not StepMode.FULL]
    assert len(maps) == 4  # the fill step (t0 - 1 = 2) and the pruned steps 3, 4, 5
    for attention in maps:
        assert attention.shape == (2, 64 + text, 64 + text)  # one row per prompt (the conditional half)
        assert torch.allclose(attention.sum(-1), torch.ones(2, 64 + text), atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_each_pruned_step_keeps_the_top_pagerank_tokens_of_the_step_before(case: str) -> None:
    _, calls, _ = run_recording(case, "at-edm")
    num_kept = CATPruningConfig().num_kept(64)
    for before, call in itertools.pairwise(calls):
        if call["mode"] is StepMode.PRUNED:
            expected = weighted_pagerank(before["map"])[:, :64].topk(num_kept).indices.sort().values
            assert torch.equal(call["indices"], torch.cat([expected, expected]))  # both CFG rows


def test_other_strategies_capture_nothing_and_the_capture_costs_one_product_per_step() -> None:
    pipe, calls, _ = run_recording("pixart", "cat")
    assert all(call["map"] is None for call in calls)
    cat_macs = pipe.transformer._catprune_engine.stats.macs
    pipe, _, _ = run_recording("pixart", "at-edm")
    attention = pipe.transformer.transformer_blocks[0].attn1
    # Fill step and 3 pruned steps, 2 prompts, Q K^T over 64 tokens at the block's width.
    assert pipe.transformer._catprune_engine.stats.macs - cat_macs == 4 * 2 * 64 * 64 * attention.inner_dim


def test_remove_restores_the_original_after_at_edm() -> None:
    make, prompts, extra, _ = CASES["sd3"]
    pipe = make()
    kwargs = dict(**prompts(1), num_inference_steps=5, output_type="latent", **extra)
    reference = pipe(latents=seeded_latents(1), **kwargs).images
    apply_cat_pruning(pipe, CATPruningConfig(strategy="at-edm", start_step=2))
    pruned = pipe(latents=seeded_latents(1), **kwargs).images
    remove_cat_pruning(pipe)
    assert not torch.equal(pruned, reference)
    assert torch.equal(pipe(latents=seeded_latents(1), **kwargs).images, reference)


def test_the_fill_step_map_is_the_blocks_attention_probabilities() -> None:
    """At the fill step every query is fresh: the map equals softmax(Q K^T / sqrt(d)) of the middle block's
    joint attention, computed here from its projections, conditional rows, averaged over heads."""
    make, prompts, extra, _ = CASES["sd3"]
    pipe = make()
    state = apply_cat_pruning(pipe, CATPruningConfig(strategy="at-edm", start_step=3))
    attention = pipe.transformer.transformer_blocks[1].attn  # the middle of the two blocks' attentions
    expected: list[torch.Tensor] = []

    assert attention.norm_q is None and attention.norm_added_q is None  # SD3 medium: no q/k norms

    def joint(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, n, heads, d) projections of [image tokens, text tokens], the conditional row only."""
        return torch.cat([image, text], dim=1).unflatten(-1, (attention.heads, -1))[1:]

    def reference(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if state.mode is StepMode.FILL:
            image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            query = joint(attention.to_q(image), attention.add_q_proj(text))
            key = joint(attention.to_k(image), attention.add_k_proj(text))
            logits = torch.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5
            expected.append(logits.softmax(-1).mean(1))

    attention.register_forward_pre_hook(reference, with_kwargs=True)
    maps: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(
        lambda *_: maps.append(state.slot.capture.map) if state.mode is StepMode.FILL else None
    )
    pipe(**prompts(1), num_inference_steps=4, latents=seeded_latents(1), output_type="latent", **extra)
    assert len(expected) == len(maps) == 1
    assert torch.allclose(maps[0], expected[0], atol=1e-6)
