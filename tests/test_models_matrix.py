"""The support matrix (``docs/models.md``, written by ``catprune models``) and the refusal of an unsupported
transformer class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AuraFlowTransformer2DModel

from catprune import apply_cat_pruning
from catprune.adapters import ADAPTERS
from catprune.tools.models import TESTED_PIPELINES, matrix_markdown, matrix_rows, transformer_classes

ROOT = Path(__file__).resolve().parents[1]


def test_docs_models_md_is_the_commands_output() -> None:
    assert (ROOT / "docs" / "models.md").read_text() == matrix_markdown(), (
        "docs/models.md is stale: run `catprune models --write docs/models.md`"
    )


def test_every_transformer_class_is_in_the_matrix_and_every_registered_one_is_supported() -> None:
    rows = {name: (mark, detail) for name, mark, _, detail in matrix_rows()}
    assert len(transformer_classes()) > 50 and set(rows) == {cls.__name__ for cls in transformer_classes()}
    registered = {adapter.model_class.__name__ for adapter in ADAPTERS.values()}
    assert registered <= set(rows)
    assert {name for name, (mark, _) in rows.items() if mark == "yes"} == registered
    assert all(detail for _, detail in rows.values())


def test_the_pipelines_listed_as_tested_are_run_by_the_tests() -> None:
    assert set(TESTED_PIPELINES) == set(ADAPTERS)
    tests = "".join(
        path.read_text() for path in (ROOT / "tests").glob("test_*.py") if path.name != Path(__file__).name
    )
    for family, pipelines in TESTED_PIPELINES.items():
        for pipeline in pipelines:
            assert f"{pipeline}" in tests, f"{family}: {pipeline} is listed as tested but no test names it"


def test_an_unsupported_class_is_refused_with_its_name_its_reason_and_the_matrix() -> None:
    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(num_mmdit_layers=1, num_single_dit_layers=1)
    with pytest.raises(TypeError, match=r"AuraFlowTransformer2DModel: no adapter yet.*docs/models\.md"):
        apply_cat_pruning(model)
