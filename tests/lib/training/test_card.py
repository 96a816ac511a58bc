"""The model card (a checkpoint's README.md): Hugging Face's `ModelCard` reads it, it names every
source a run's settings name with its licence, and the committed default's card is what the
renderer writes from its training card. No training here (test_training_runs.py reads a trained
checkpoint's card)."""

from __future__ import annotations

import json
import re
import shlex
from fnmatch import fnmatch

import pytest
from huggingface_hub import ModelCard

import lib.corpora
import lib.data
from lib.checkpoint import CARD_FILE, CHECKPOINT_FILE_PATTERNS
from lib.presets import DEFAULT_CHECKPOINT, REPO_ROOT
from lib.training.card import (
    CODE_LICENCE,
    HELDOUT,
    RECIPE_RUN,
    SOURCES,
    model_licence,
    render_model_card,
    run_sources,
    training_command,
)
from lib.training.config import TrainingConfig
from train_distributed import build_parser

DEFAULT_CARD = json.loads((DEFAULT_CHECKPOINT / CARD_FILE).read_text(encoding="utf-8"))
MAKEFILE = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")

# What the default model trained on and was evaluated on, and their licences, as lib/data.py,
# lib/corpora.py, the Makefile and docs/train.md ("The embedded default model") state them
DEFAULT_TRAINING = {
    "rl_wsd_labeled": "MIT",
    "wesnoth-1.16-*": "GPL-2+",
    "fortunes-ru": "GPL-2",
    "freedroidrpg-data": "GPL-2+",
    "ufoai-misc": "GPL-2+",
    "widelands-data": "GPL-2+",
}
DEFAULT_HELDOUT = {"ru-proverbs": "Apache-2.0", "freeciv-nations": "GPL-2+"}


def test_the_default_model_card_parses_and_names_every_source_and_licence():
    card = ModelCard.load(DEFAULT_CHECKPOINT / "README.md")
    data = card.data
    assert (data.language, data.library_name, data.pipeline_tag) == (
        "ru",
        "transformers",
        "text-generation",
    )
    # MIT, GPL-2+ and GPL-2 training text: GPL-2.0 is the one licence that honours all three
    assert data.license == "gpl-2.0"
    assert data.model_name == DEFAULT_CARD["model_id"]
    trained = {s["name"]: s["license"] for s in data.training_data}
    assert trained == {"bundled": "MIT", "wesnoth-ru": "GPL-2+", "fortunes-ru": "GPL-2"} | {
        "games-ru": "GPL-2+"
    }
    assert {s["name"]: s["license"] for s in data.evaluation_data} == DEFAULT_HELDOUT
    for package, licence in (DEFAULT_TRAINING | DEFAULT_HELDOUT).items():
        row = next(line for line in card.text.splitlines() if f"`{package}" in line)
        assert f"| {licence} |" in row, package
    # every figure of the training card, validation and each held-out set, in the model-index
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("bundled", "bits_per_byte")] == DEFAULT_CARD["val_bits_per_byte"]
    assert results[("bundled", "loss")] == DEFAULT_CARD["val_loss"]
    for name, value in DEFAULT_CARD["heldout_bits_per_byte"].items():
        assert results[(name, "bits_per_byte")] == value
        assert f"`{name}` (held out, never trained on)" in card.text
    for heading in ("Intended use", "Limitations", "Training data", "Licence", "Evaluation"):
        assert f"\n## {heading}\n" in card.text
    assert "make corpus heldout train-baseline" in card.text
    assert "make promote-default" in card.text
    assert f"{DEFAULT_CARD['parameters']:,} parameters" in card.text


def test_the_committed_card_is_what_the_renderer_writes_from_the_training_card():
    """Regenerate it with `render_model_card` (the weights' hash does not cover README.md)."""
    readme = (DEFAULT_CHECKPOINT / "README.md").read_text(encoding="utf-8")
    assert readme == render_model_card(DEFAULT_CARD)
    for name in ("README.md", CARD_FILE):  # outside the checkpoint's content hash
        assert not any(fnmatch(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)


def test_the_sources_a_card_names_come_from_its_settings():
    config = DEFAULT_CARD["config"]
    sources = run_sources(config)
    assert [s["path"] for s in sources] == [
        config["data"],
        *config["train_extra"],
        *(spec.partition("=")[2] for spec in config["eval_data"]),
    ]
    assert [s["name"] for s in sources if s["use"] == HELDOUT] == list(
        DEFAULT_CARD["heldout_bits_per_byte"]
    )
    own = run_sources({"data": "my-corpus/", "train_extra": ["notes.txt"]})
    assert [(s["name"], s["licence"]) for s in own] == [("my-corpus", None), ("notes", None)]


def _corpora_paragraph(package: str) -> str:
    return next(p for p in lib.corpora.__doc__.split("\n\n") if f"`{package}`" in p)


def _states(text: str, licence: str) -> bool:
    return re.search(rf"{re.escape(licence)}(?![+\w.-])", text) is not None


@pytest.mark.parametrize("key", sorted(SOURCES))
def test_each_source_s_licence_is_the_one_the_repository_states(key):
    source = SOURCES[key]
    packages = re.findall(r"`([^`]+)`", source.origin)
    if key == "bundled":
        stated = next(line for line in lib.data.__doc__.splitlines() if "rl_wsd_labeled" in line)
    elif key == "ru-proverbs.txt":
        code = (REPO_ROOT / "lib" / "data.py").read_text(encoding="utf-8")
        stated = next(line for line in code.splitlines() if line.startswith("RU_PROVERBS ="))
        assert packages == [lib.data.RU_PROVERBS]
    else:
        stated = _corpora_paragraph(packages[0])
        assert all(f"`{p}`" in stated for p in packages), key
    assert _states(stated, source.licence), (key, stated)


def test_every_file_the_makefile_fetches_is_a_known_source():
    for variable, target in (
        ("CORPORA", "make corpus"),
        ("HELDOUT", "make heldout"),
        ("HELDOUT_PROSE", "make heldout"),
    ):
        files = re.search(rf"^{variable} := (.+)$", MAKEFILE, re.MULTILINE).group(1).split()
        for path in files:
            assert SOURCES[path.rsplit("/", 1)[1]].fetch == target, path
    recipe = re.search(r"^train-baseline:.*\n\t(.+)$", MAKEFILE, re.MULTILINE).group(1)
    for key, value in RECIPE_RUN.items():
        assert f"--{key.replace('_', '-')} {value}" in recipe
    assert f'license = {{ text = "{CODE_LICENCE}" }}' in (REPO_ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize(
    ("licences", "expected"),
    [
        (["MIT"], "mit"),
        (["MIT", "GPL-2+", "GPL-2"], "gpl-2.0"),
        (["MIT", "GPL-2+"], "gpl-2.0"),
        (["MIT", "GPL-3+", "GPL-2+"], "gpl-3.0"),
        (["MIT", "CC-BY-SA-3.0"], "cc-by-sa-3.0"),
        (["GPL-2", "GPL-3+"], "other"),  # GPL-2 without "or later" and GPL-3: no one licence
        (["GPL-2+", "CC-BY-SA-3.0"], "other"),
        (["MIT", None], "unknown"),  # a source that is not one of the repository's
        ([], "unknown"),
    ],
)
def test_the_model_licence_honours_every_training_licence(licences, expected):
    assert model_licence(licences) == expected


def test_held_out_sets_do_not_bear_on_the_licence_and_other_cards_parse():
    config = {"data": "bundled", "eval_data": ["ru-proverbs=.cache/heldout/ru-proverbs.txt"]}
    card = ModelCard(render_model_card({"model_id": "m", "config": config}))
    assert card.data.license == "mit"  # the proverbs' Apache-2.0 is evaluation only
    assert [s["name"] for s in card.data.evaluation_data] == ["ru-proverbs"]
    mixed = {
        "data": "bundled",
        "train_extra": [".cache/corpus/cataclysm-ru.txt", "x/fortunes-ru.txt"],
    }
    card = ModelCard(render_model_card({"config": mixed}))
    assert (card.data.license, card.data.license_name) == ("other", "training-data-licences")
    assert "CC-BY-SA-3.0" in card.text and "No one licence honours" in card.text
    bare = ModelCard(render_model_card({"samples": [{"prompt": "a", "completion": "b"}]}))
    assert bare.data.license == "unknown" and "- **a** → b" in bare.text


def test_the_card_s_command_reproduces_its_settings():
    config = DEFAULT_CARD["config"]
    argv = shlex.split(" ".join(training_command(config)))
    assert argv[:2] == ["python", "train_distributed.py"]
    parsed = TrainingConfig.from_args(build_parser(environ={}).parse_args(argv[2:]))
    reproduced = json.loads(json.dumps(parsed.to_dict()))
    # settings added after the card was written (the LoRA ones) take their defaults
    newer = {k: v for k, v in reproduced.items() if k not in config}
    assert newer == {
        k: v for k, v in json.loads(json.dumps(TrainingConfig().to_dict())).items() if k in newer
    }
    assert {k: v for k, v in reproduced.items() if k in config} == json.loads(json.dumps(config))
    assert training_command(TrainingConfig().to_dict()) == ["python train_distributed.py"]
