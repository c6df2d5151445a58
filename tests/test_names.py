"""What users read names each source after what it is: no internal "seed" numbers (a source's
number in the project's own notes) in the package, its docs, suites, tests or benchmarks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
PLACES: Final = (
    "pytest_vram",
    "README.md",
    "DEVELOPERS.md",
    "docs",
    "suites",
    "tests",
    "benchmarks",
)
# Assembled, so that this file's own text never matches it.
_WORD: Final = "se" + "ed"
INTERNAL: Final = re.compile(rf"(?i){_WORD} ?0\d\d|{_WORD.upper()}_\d")


def text_files(root: Path, places: tuple[str, ...]) -> Iterator[Path]:
    for place in places:
        path = root / place
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in candidates:
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                yield file


def internal_names(root: Path, places: tuple[str, ...] = PLACES) -> list[str]:
    """Every match as "path:line: text"."""
    found = []
    for file in text_files(root, places):
        text = file.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if INTERNAL.search(line):
                found.append(f"{file.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_internal_source_names() -> None:
    found = internal_names(ROOT)
    assert not found, (
        "internal source names; name each source after what it is (its paper, article or "
        "discussion):\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "line",
    [
        "the table " + _WORD + " 000 shows as an image",
        "references." + _WORD.upper() + "_003",
        "def test_" + _WORD + "_000_lomo():",
        _WORD.capitalize() + "012 says",
    ],
)
def test_the_check_finds_internal_names(tmp_path: Path, line: str) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(f"fine\n{line}\n")
    (tmp_path / "README.md").write_text(f"a {_WORD} of 0 and {_WORD}=42 are fine\n")
    assert internal_names(tmp_path, ("docs", "README.md")) == [f"docs/x.md:2: {line}"]
