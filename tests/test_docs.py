"""Every relative link in README.md and docs/*.md points at a file of the repository
(result files, sources, plots): a moved or renamed file breaks this test, not the page."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")   # [text](target) or ![alt](target)


def _relative_links(page):
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = _relative_links(page)
    missing = [t for t in links if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_pages_have_links():
    """The pattern finds links at all (README links result files and sources)."""
    assert len(_relative_links(ROOT / "README.md")) >= 10
    assert len(_relative_links(ROOT / "docs" / "performance_history.md")) >= 5
