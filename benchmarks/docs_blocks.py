"""Marker-delimited blocks in docs/performance.md, so each benchmark (and each machine it ran on)
rewrites only its own table and never the prose or another benchmark's results."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def replace_block(name: str, content: str, *, heading: str, path: Path = DOC) -> None:
    """Put ``content`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``;
    a block that is not there yet is appended under ``heading``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{content.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)
