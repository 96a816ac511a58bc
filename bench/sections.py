"""Rewriting a benchmark's own part of a markdown file (BENCHMARKS.md) between its markers."""

from __future__ import annotations


def replace_marked(text: str, section: str, start: str, end: str) -> str | None:
    """`text` with everything from `start` to `end` (both included) replaced by `section`, which
    carries the markers itself; None where `text` has no `start` (the caller adds the section)."""
    if start not in text:
        return None
    head, rest = text.split(start, 1)
    return head + section + rest.split(end, 1)[1]
