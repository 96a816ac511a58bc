"""Rewriting a benchmark's own part of a markdown file (BENCHMARKS.md) between its markers."""

from __future__ import annotations


def replace_marked(text: str, section: str, start: str, end: str) -> str | None:
    """`text` with everything from `start` to `end` (both included) replaced by `section`, which
    carries the markers itself; None where `text` has no `start` (the caller adds the section)."""
    if start not in text:
        return None
    head, rest = text.split(start, 1)
    return head + section + rest.split(end, 1)[1]


def put_in_history(text: str, title: str, section: str, start: str, end: str) -> str:
    """`text` with `section` (which carries its markers `start`/`end`) put where they are, or,
    the first time, under `title` as the newest entry of the "## History" part (at the end where
    there is none)."""
    replaced = replace_marked(text, section, start, end)
    if replaced is not None:
        return replaced
    head, sep, rest = text.partition("\n## History\n")
    if not sep:
        return text.rstrip("\n") + f"\n\n{title}\n\n{section}\n"
    intro, first, entries = rest.partition("\n### ")
    return f"{head}{sep}{intro}\n{title}\n\n{section}\n{first}{entries}"
