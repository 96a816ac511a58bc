"""Extra Russian training text from what the package registries ship (nothing from the web).

`fetch_wesnoth(dest)`: the Russian translations of The Battle for Wesnoth's campaigns (Debian
`wesnoth-1.16-*`, GPL-2+): story narration and dialogue, about 1 M characters in 16 campaigns.
Only the packages' files are downloaded (`apt-get download`, no installation, no root), their
gettext catalogues (`locale/ru/LC_MESSAGES/*.mo`) read with Python's `gettext`, and each
translated message cleaned into one line of plain text: markup, placeholders and short UI
strings are dropped. The result is a .txt of one document per line, written atomically, that
`--train-extra` adds to the training split (the validation split stays the main corpus's).
"""

from __future__ import annotations

import gettext
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

WESNOTH_CAMPAIGNS = (
    "did", "dm", "dw", "ei", "httt", "l", "low", "nr", "sof", "sota", "sotbe", "thot", "trow",
    "tsg", "ttb", "utbs",
)  # fmt: skip
WESNOTH_VERSION = "1.16"
MIN_CHARS = 30  # shorter messages are mostly names, buttons and labels
_MARKUP = re.compile(r"<[^>]*>")  # Pango markup: <b>, <span ...>, <i>
_SPACE = re.compile(r"\s+")
_CYRILLIC = re.compile(r"[а-яА-ЯёЁ]")
_LETTER = re.compile(r"[^\W\d_]")


def clean_message(text: str) -> str | None:
    """One translated message as plain text, or None when it is not prose: placeholders
    ($name, {macro}), image references (&, =), mostly non-Cyrillic text, or too short."""
    if any(c in text for c in "${}&=@|[]#"):
        return None
    text = _SPACE.sub(" ", _MARKUP.sub("", text)).strip()
    letters = _LETTER.findall(text)
    if len(text) < MIN_CHARS or not letters:
        return None
    if len(_CYRILLIC.findall(text)) < 0.8 * len(letters):
        return None
    return text


def catalog_messages(mo_file: Path) -> list[str]:
    """The translated messages of a gettext catalogue, in msgid order (a fixed order)."""
    with open(mo_file, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    return [v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])) if k and v]


def fetch_wesnoth(dest: str | Path, campaigns: tuple[str, ...] = WESNOTH_CAMPAIGNS) -> Path:
    """Write the Wesnoth campaigns' Russian text to `dest` (nothing is done when it exists)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("the Wesnoth corpus needs apt-get and dpkg-deb (Debian or Ubuntu)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    packages = [f"wesnoth-{WESNOTH_VERSION}-{c}" for c in campaigns]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", "-q", *packages], cwd=work, check=True)
        docs: dict[str, None] = {}
        for deb in sorted(work.glob("*.deb")):
            tree = work / deb.stem
            tree.mkdir()
            with subprocess.Popen(
                ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE
            ) as p:
                subprocess.run(
                    ["tar", "-x", "-C", str(tree), "--wildcards", "*/locale/ru/LC_MESSAGES/*.mo"],
                    stdin=p.stdout,
                    check=True,
                )
            deb.unlink()  # the packages hold images and maps too: keep only the text
            for mo in sorted(tree.rglob("*.mo")):
                for message in catalog_messages(mo):
                    text = clean_message(message)
                    if text:
                        docs.setdefault(text)
            shutil.rmtree(tree)
        part = work / dest.name
        part.write_text("\n".join(docs) + "\n", encoding="utf-8")
        os.replace(part, dest)
    return dest


if __name__ == "__main__":
    import sys

    out = fetch_wesnoth(sys.argv[1] if len(sys.argv) > 1 else ".cache/corpus/wesnoth-ru.txt")
    lines = out.read_text(encoding="utf-8").splitlines()
    print(f"{out}: {len(lines)} documents, {sum(map(len, lines)):,} characters")
