"""Generated blocks inside hand-written docs: the text between a pair of HTML comment markers."""

from __future__ import annotations

from pathlib import Path


def replace_block(docs: Path, names: tuple[str, ...], begin: str, end: str, block: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) in place of the marked text of
    every doc in `names` that exists and has the markers."""
    for name in names:
        doc = docs / name
        if not doc.is_file():
            continue
        text = doc.read_text()
        if begin in text:
            a, b = text.index(begin), text.index(end) + len(end)
            doc.write_text(text[:a] + block + text[b:])
