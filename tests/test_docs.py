"""The documentation stays inside the repository: every relative link of README.md and docs/*.md names a
file or folder of the repository, and no page cites a path outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
"""A markdown link or image: ``[text](target)``, ``![alt](target "title")``."""
EXTERNAL = ("http://", "https://", "mailto:", "#")
OUTSIDE_PATH = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-]+(?:/[\w.-]+)*")
"""A path that climbs out of its folder (``../shared/x.md``): fine only where it names a file of the
repository."""


def relative_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [target for target in LINK.findall(text) if not target.startswith(EXTERNAL)]


def inside_repository(page: Path, target: str) -> Path | None:
    """The file ``target`` names from ``page`` if it exists inside the repository, else None."""
    path = (page.parent / target.split("#", 1)[0]).resolve()
    return path if path.exists() and path.is_relative_to(ROOT) else None


def test_the_pages_have_links() -> None:
    assert len(PAGES) > 5 and sum(len(relative_links(page)) for page in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    broken = [target for target in relative_links(page) if inside_repository(page, target) is None]
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve inside the repository: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_page_cites_a_path_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    outside = [match for match in OUTSIDE_PATH.findall(text) if inside_repository(page, match) is None]
    assert not outside, f"{page.relative_to(ROOT)} cites paths outside the repository: {outside}"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    page = ROOT / "docs" / "method.md"
    assert inside_repository(page, "authors-code.md") is not None
    assert inside_repository(page, "../README.md#commands") is not None
    assert inside_repository(page, "../../shared/reference/official-implementation.md") is None
    assert inside_repository(page, "no-such-page.md") is None
    cited = OUTSIDE_PATH.findall("facts: `../shared/reference/official-implementation.md`")
    assert cited == ["../shared/reference/official-implementation.md"]
    assert inside_repository(page, cited[0]) is None  # what docs/method.md cited before
    assert LINK.findall('[a](docs/x.md) ![b](docs/y.png "t") [c](https://x.org)') == [
        "docs/x.md",
        "docs/y.png",
        "https://x.org",
    ]
