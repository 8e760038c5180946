"""The front door and the documents it points to: every relative link resolves, and the README
stays short enough to read in five minutes, its two commands first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    targets = [t.split("#")[0] for t in LINK.findall(document.read_text()) if "://" not in t and not t.startswith(("#", "mailto:"))]
    missing = [t for t in targets if t and not (document.parent / t).exists()]
    assert not missing, f"{document.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readme_starts_with_the_two_commands_and_stays_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert [line.split("#")[0].strip() for line in lines[2:4]] == ["make demo", "make test"]
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; results go to docs/results.md"
    assert (ROOT / "docs" / "results.md").is_file() and (ROOT / "docs" / "architecture.md").is_file()
