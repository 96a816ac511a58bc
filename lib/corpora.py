"""Extra Russian training text from what the package registries ship (nothing from the web).

`fetch_manpages(dest)`: Debian's Russian manual pages (`manpages-ru`, `manpages-ru-dev`, GPL-3+):
technical prose, rendered from roff to paragraphs by `roff_paragraphs` (requests dropped, font
and character escapes resolved, lines rejoined), Russian paragraphs of 80 characters or more kept.

`fetch_wesnoth(dest)`: the Russian translations of The Battle for Wesnoth's campaigns (Debian
`wesnoth-1.16-*`, GPL-2+): story narration and dialogue, about 1 M characters in 16 campaigns.
Only the packages' files are downloaded (`apt-get download`, no installation, no root), their
gettext catalogues (`locale/ru/LC_MESSAGES/*.mo`) read with Python's `gettext`, and each
translated message cleaned into one line of plain text: markup, placeholders and short UI
strings are dropped. The result is a .txt of one document per line, written atomically, that
`--train-extra` adds to the training split (the validation split stays the main corpus's).

`fetch_fortunes(dest)`: Russian fortune cookies (Debian `fortunes-ru`, GPL-2): about 19,000 short
texts (aphorisms, quotations, jokes, dialogue), 1.55 M characters; each fortune is one document,
its wrapped lines rejoined and its attribution line (`-- Author`) dropped.

`fetch_games(dest)`: the Russian translations of three more games (Debian `freedroidrpg-data`,
`ufoai-misc`, `widelands-data`; GPL-2+): FreedroidRPG's dialogue, UFO: Alien Invasion's research
reports and briefings, Widelands' campaign story and tribe encyclopedia, about 8,400 messages and
1.2 M characters, cleaned like Wesnoth's (the packages weigh 0.6 GB; only their catalogues are kept).

`fetch_cataclysm(dest)`: the Russian translation of Cataclysm: Dark Days Ahead (Debian
`cataclysm-dda-data`, CC-BY-SA-3.0): item, place and mutation descriptions, character backstories
and NPC dialogue of a post-apocalyptic survival game, about 26,000 messages and 2.7 M characters
(the package is 30 MB). Its messages carry placeholders the game fills in (`%s`, `<npcname>`):
`clean_message` drops those messages and keeps the ones whose tags only format text.

`fetch_freeciv_nations(dest)`: not training text but a second out-of-domain evaluation set
(`make heldout`): the Russian legends of Freeciv's nations (Debian `freeciv-data`, GPL-2+), 507
paragraphs of encyclopedic history, 0.2 M characters, a genre far from the training text.
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
# Tags that only format text (Pango's, Cataclysm's colours and emphasis); any other tag is a
# placeholder the game fills in (<npcname>, <city>, <swear>), so its message is not prose.
_FORMAT_TAG = re.compile(
    r"</?(b|i|u|s|tt|big|small|sub|sup|span|br|p|font|color(_\w+)?|info|bold|good|bad|neutral"
    r"|stat)(\s[^>]*)?/?>"
)
_BREAK = re.compile(r"<br\s*/?>")
_PRINTF = re.compile(r"%(\d+\$)?[-+#0-9.]*[sdiuxfgc]")  # %s, %d, %1$s: filled in by the game
_SPACE = re.compile(r"\s+")
_CYRILLIC = re.compile(r"[а-яА-ЯёЁ]")
_LETTER = re.compile(r"[^\W\d_]")


def clean_message(text: str) -> str | None:
    """One translated message as plain text, or None when it is not prose: placeholders
    ($name, {macro}, %s, <npcname>), image references (&, =), mostly non-Cyrillic text, or too
    short."""
    if any(c in text for c in "${}&=@|[]#") or _PRINTF.search(text):
        return None
    if _MARKUP.search(_FORMAT_TAG.sub("", text)):
        return None  # a placeholder tag
    text = _SPACE.sub(" ", _MARKUP.sub("", _BREAK.sub(" ", text))).strip()
    return text if _russian_prose(text, MIN_CHARS, 0.8) else None


def catalog_messages(mo_file: Path) -> list[str]:
    """The translated messages of a gettext catalogue, in msgid order (a fixed order)."""
    with open(mo_file, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    return [v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0])) if k and v]


MANPAGES = ("manpages-ru", "manpages-ru-dev")
FORTUNES = ("fortunes-ru",)
GAMES = ("freedroidrpg-data", "ufoai-misc", "widelands-data")
CATACLYSM = ("cataclysm-dda-data",)
_ESCAPES = (
    (r"\(em", "—"), (r"\(en", "–"), (r"\(aq", "'"), (r"\(dq", '"'), (r"\(lq", "«"),
    (r"\(rq", "»"), (r"\(bu", "•"), (r"\-", "-"), (r"\e", "\\"), (r"\&", ""), (r"\ ", " "),
    (r"\~", " "), (r"\|", ""), (r"\^", ""), (r"\%", ""), (r"\c", ""),
)  # fmt: skip
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_OTHER_ESCAPE = re.compile(r"\\(\(..|\*\(..|\*.|[a-zA-Z]\[[^\]]*\]|.)")
_TEXT_MACROS = {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"}
_BREAK_MACROS = {
    "SH",
    "SS",
    "PP",
    "LP",
    "P",
    "TP",
    "IP",
    "HP",
    "RS",
    "RE",
    "TH",
    "EX",
    "EE",
    "nf",
    "fi",
    "sp",
    "br",
    "in",
    "ti",
}


def roff_text(line: str) -> str:
    for escape, char in _ESCAPES:
        line = line.replace(escape, char)
    return _OTHER_ESCAPE.sub("", _FONT.sub("", line))


def roff_paragraphs(source: str) -> list[str]:
    """The paragraphs of a man page's roff source as plain text (one line each)."""
    paragraphs, current = [], []

    def flush() -> None:
        if current:
            paragraphs.append(_SPACE.sub(" ", " ".join(current)).strip())
            current.clear()

    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"")) or raw.startswith('.\\"'):
            continue  # a comment
        if raw.startswith((".", "'")):
            name, _, args = raw[1:].strip().partition(" ")
            if name in _TEXT_MACROS:
                current.append(roff_text(args.replace('"', "")))
            elif name in _BREAK_MACROS or name:
                flush()
            continue
        if not raw.strip():
            flush()
            continue
        current.append(roff_text(raw))
    flush()
    return [p for p in paragraphs if p]


def _russian_prose(text: str, min_chars: int, share: float) -> bool:
    letters = _LETTER.findall(text)
    return (
        len(text) >= min_chars
        and bool(letters)
        and len(_CYRILLIC.findall(text)) >= share * len(letters)
    )


def _fetch_debian(dest: str | Path, packages, members: str, documents) -> Path:
    """Download the Debian `packages` (`apt-get download`: no installation, no root), extract
    their files matching `members` (a tar wildcard), and write `documents(tree)`'s texts,
    deduplicated, one per line, to `dest` atomically. Nothing is done when `dest` exists."""
    dest = Path(dest)
    if dest.exists():
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{dest.name} needs apt-get and dpkg-deb (Debian or Ubuntu)")
    dest.parent.mkdir(parents=True, exist_ok=True)
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
                tar = ["tar", "-x", "-C", str(tree), "--wildcards", members]
                subprocess.run(tar, stdin=p.stdout, check=True)
            deb.unlink()  # the packages hold images, maps and more: only the text is kept
            docs.update(dict.fromkeys(documents(tree)))
            shutil.rmtree(tree)
        part = work / dest.name
        part.write_text("\n".join(docs) + "\n", encoding="utf-8")
        os.replace(part, dest)
    return dest


def _manpage_documents(tree: Path):
    import gzip

    for page in sorted(tree.rglob("*.gz")):
        source = gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace")
        for paragraph in roff_paragraphs(source):
            if _russian_prose(paragraph, 80, 0.6):
                yield paragraph


def _gettext_documents(tree: Path):
    for mo in sorted(tree.rglob("*.mo")):
        for message in catalog_messages(mo):
            text = clean_message(message)
            if text:
                yield text


_ATTRIBUTION = re.compile(r"^\s*--")  # "\t\t-- Author": the quote's source, not its text


def fortune_texts(source: str) -> list[str]:
    """The fortunes of a fortune(6) data file (texts separated by lines of `%`), each as one
    line of plain text: wrapped lines rejoined, the attribution lines (`-- Author`) dropped."""
    texts = []
    for block in re.split(r"^%\s*$", source, flags=re.MULTILINE):
        lines = [line for line in block.splitlines() if not _ATTRIBUTION.match(line)]
        text = _SPACE.sub(" ", " ".join(lines)).strip()
        if text:
            texts.append(text)
    return texts


def _fortune_documents(tree: Path):
    for path in sorted(tree.rglob("*")):
        if path.is_file() and path.suffix != ".dat":  # .dat: fortune's binary index
            source = path.read_bytes().decode("utf-8", errors="replace")
            for text in fortune_texts(source):
                if _russian_prose(text, 20, 0.8):
                    yield text


def fetch_manpages(dest: str | Path, packages: tuple[str, ...] = MANPAGES) -> Path:
    """Write the Russian manual pages' prose to `dest` (nothing is done when it exists)."""
    return _fetch_debian(dest, packages, "*/man/ru/*", _manpage_documents)


def fetch_wesnoth(dest: str | Path, campaigns: tuple[str, ...] = WESNOTH_CAMPAIGNS) -> Path:
    """Write the Wesnoth campaigns' Russian text to `dest` (nothing is done when it exists)."""
    packages = [f"wesnoth-{WESNOTH_VERSION}-{c}" for c in campaigns]
    return _fetch_debian(dest, packages, "*/locale/ru/LC_MESSAGES/*.mo", _gettext_documents)


def fetch_games(dest: str | Path, packages: tuple[str, ...] = GAMES) -> Path:
    """Write the Russian text of three more games' translations to `dest` (nothing is done
    when it exists)."""
    return _fetch_debian(dest, packages, "*/ru/LC_MESSAGES/*.mo", _gettext_documents)


def fetch_cataclysm(dest: str | Path) -> Path:
    """Write the Russian text of Cataclysm: Dark Days Ahead's translation to `dest` (nothing is
    done when it exists): item and place descriptions, character backstories, NPC dialogue."""
    return _fetch_debian(
        dest, CATACLYSM, "*/locale/ru/LC_MESSAGES/cataclysm-dda.mo", _gettext_documents
    )


def fetch_freeciv_nations(dest: str | Path) -> Path:
    """Write the Russian legends of Freeciv's nations to `dest` (nothing is done when it exists):
    a second out-of-domain evaluation set, encyclopedic history prose, never trained on."""
    return _fetch_debian(
        dest, ("freeciv-data",), "*/locale/ru/LC_MESSAGES/freeciv-nations.mo", _gettext_documents
    )


def fetch_fortunes(dest: str | Path, packages: tuple[str, ...] = FORTUNES) -> Path:
    """Write Russian fortune cookies' texts to `dest` (nothing is done when it exists)."""
    return _fetch_debian(dest, packages, "*/fortunes/ru/*", _fortune_documents)


if __name__ == "__main__":
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else ".cache/corpus/wesnoth-ru.txt"
    fetchers = {
        "manpages": fetch_manpages,
        "fortunes": fetch_fortunes,
        "freeciv": fetch_freeciv_nations,
        "games": fetch_games,
        "cataclysm": fetch_cataclysm,
    }
    fetch = next((f for key, f in fetchers.items() if key in Path(name).name), fetch_wesnoth)
    out = fetch(name)
    lines = out.read_text(encoding="utf-8").splitlines()
    print(f"{out}: {len(lines)} documents, {sum(map(len, lines)):,} characters")
