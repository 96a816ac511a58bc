"""What names an adapter, and finding the adapters of a directory, without torch (for the service's
settings, which load without it; `adapters.py` loads and serves them)."""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "adapter_config.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters, letters, digits, '.', '_' or '-', starting with a letter or digit"


def name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None when it can (`adapters.check_name`'s rule)."""
    if isinstance(name, str) and NAME.match(name):
        return None
    return f"adapter name {name!r}: {NAME_RULE}"


def find_adapters(directory: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The adapters of `directory`: (name, path) of each subdirectory holding an
    `adapter_config.json`, named after it, in name order; and the problems of those whose name
    cannot name an adapter (left out)."""
    found, problems = [], []
    for sub in sorted(Path(directory).iterdir()):
        if sub.is_dir() and (sub / CONFIG).is_file():
            if problem := name_problem(sub.name):
                problems.append(f"{sub}: {problem}")
            else:
                found.append((sub.name, str(sub)))
    return found, problems
