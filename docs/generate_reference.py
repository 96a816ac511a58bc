#!/usr/bin/env python
"""Write the reference pages of docs/reference/ from the code, so they cannot drift from it.

    .venv/bin/python docs/generate_reference.py           # rewrite the four pages (make docs-reference)
    .venv/bin/python docs/generate_reference.py --check   # exit 1 when a committed page differs

- settings.md: every field of `ml_service.settings.Settings` (its variable, serve.py option,
  values, default and description);
- training-flags.md: every option of `train_distributed.py`, from the parser it builds
  (`lib.cli.add_config_arguments` over `TrainingConfig`), grouped as lib/training/settings.py
  groups the settings;
- errors.md: every status the service answers, from the error map (ml_service/backend/errors.py:
  the classes, `openapi_responses`, and the app's OpenAPI description);
- metrics.md: every metric family a replica's `GET /metrics` exports (an app built by
  `create_app` around the committed default model, scraped once).

The output is deterministic: no absolute paths, timestamps, metric values or machine-dependent
defaults, and the settings ignore the environment (the declared defaults). tests/docs/
test_reference.py regenerates each page in memory and fails when the committed one differs.
Docs tooling: it sits above `lib` and `ml_service` (as bench/ does), and neither imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: train_distributed.py lives at the root
    sys.path.insert(0, str(REPO_ROOT))

from pydantic import AliasChoices, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_settings import PydanticBaseSettingsSource  # noqa: E402

REFERENCE_DIR = REPO_ROOT / "docs" / "reference"
SCRIPT = "docs/generate_reference.py"
COMMAND = "make docs-reference"


# -- Markdown ---------------------------------------------------------------------------------------
def note(source: str) -> str:
    """The first line of every page: generated, from what, by which command."""
    return (
        f"_Generated from {source} by `{COMMAND}` (`{SCRIPT}`): change the code and rerun it; "
        "do not edit this page by hand._"
    )


def text(value: str) -> str:
    """Prose in a table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def code(value: object) -> str:
    """A value as inline code in a table cell."""
    s = str(value)
    if "|" in s or "`" in s or "\n" in s:
        raise ValueError(f"cannot show {s!r} as inline code in a table")
    return f"`{s}`"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def page(source: str, title: str, *sections: str) -> str:
    return "\n\n".join([note(source), f"# {title}", *sections]) + "\n"


def docstring(obj: object) -> str:
    """An object's docstring as one paragraph."""
    return " ".join((inspect.getdoc(obj) or "").split())


def relative(path: Path) -> str:
    """A path as the repository sees it: relative to the repository root."""
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        raise ValueError(f"{path} is outside the repository: not a reproducible default") from None


# -- settings.md ------------------------------------------------------------------------------------
def _declared_defaults(settings_cls: type) -> type:
    """`settings_cls` reading its init arguments only: no environment, no .env, no secrets dir,
    so what a page shows never depends on the machine that generates it."""

    class Declared(settings_cls):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings: PydanticBaseSettingsSource, **_others
        ):
            return (init_settings,)

    Declared.__name__ = Declared.__qualname__ = settings_cls.__name__
    return Declared


def environment_variables(name: str, field: FieldInfo, config: dict) -> list[str]:
    """The variables that set a field (pydantic-settings: an alias replaces the prefixed name;
    of several choices, the first one set wins)."""
    alias = field.validation_alias or field.alias
    if alias is None:
        names = [f"{config.get('env_prefix', '')}{name}"]
    elif isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str)]
    else:
        names = [str(alias)]
    if not config.get("case_sensitive", False):
        names = [n.upper() for n in names]
    return list(dict.fromkeys(names))


def _bounds(field: FieldInfo) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for m in field.metadata:
        for attr, sign in words.items():
            if getattr(m, attr, None) is not None:
                found.append(f"{sign} {_number(getattr(m, attr))}")
    return ", ".join(found)


def _number(value: float | int) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _kind(annotation) -> str:
    """What a field takes, in words, from its annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _kind(args[0]) if len(args) == 1 else " or ".join(_kind(a) for a in args)
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(code(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"comma-separated list of {_kind(args[0])}s"
    words = {
        bool: "boolean (`true`/`false`)",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
        SecretStr: "secret",
    }
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, (int, float)):
        return code(_number(value))
    if isinstance(value, Path):
        return code(relative(value))
    if isinstance(value, (list, tuple)) and not value:
        return "empty"
    return code(value)


def settings_page() -> str:
    from lib.inference import ENGINES
    from ml_service.runner import OPTIONS
    from ml_service.settings import Settings

    config = Settings.model_config
    declared = _declared_defaults(Settings)()
    # the choices the `engine` validator accepts (a plain str field, checked against the registry)
    choices = {"engine": "one of " + ", ".join(code(n) for n in ENGINES.names(generates=True))}
    rows = []
    for name, field in Settings.model_fields.items():
        variables = environment_variables(name, field, config)
        option = code("--" + name.replace("_", "-")) if name in OPTIONS else ""
        values = choices.get(name) or _kind(field.annotation)
        if bounds := _bounds(field):
            values += f" ({bounds})"
        rows.append(
            [
                ", ".join(code(v) for v in variables),
                option,
                text(values),
                _default(getattr(declared, name)),
                text(field.description or ""),
            ]
        )
    case = "not case-sensitive" if not config.get("case_sensitive") else "case-sensitive"
    intro = (
        "The service reads one settings object, `ml_service.settings.Settings` "
        f"(pydantic-settings), from environment variables prefixed `{config['env_prefix']}` "
        f"({case}). A setting that names more than one variable takes the first one set. "
        "`serve.py` (the same as `python -m ml_service.runner`) has an option for a few of them; "
        "an option given there wins over the variable. Paths are relative to the repository "
        f"root. {len(rows)} settings."
    )
    return page(
        "`ml_service/settings.py` (`Settings`)",
        "Settings",
        intro,
        table(["variable", "serve.py", "values", "default", "description"], rows),
    )


# -- training-flags.md ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    """train_distributed.py's own parser, as in an empty environment (the CLI takes a few
    defaults from the environment; the page shows the declared ones)."""
    import train_distributed

    return train_distributed.build_parser(environ={})


def _groups() -> list[tuple[str, str, set[str]]]:
    """(name, description, field names) of each settings group, in the order of --help: the
    groups that `TrainingConfig` gathers (lib/training/settings.py)."""
    from lib.training.config import TrainingConfig

    groups = []
    for base in reversed(TrainingConfig.__bases__):  # listed last to first (config.py says why)
        if dataclasses.is_dataclass(base):
            name = base.__name__.removesuffix("Settings").lower()
            groups.append((name, docstring(base), {f.name for f in dataclasses.fields(base)}))
    return groups


def training_flags_page() -> str:
    parser = _parser()
    formatter = parser.formatter_class(prog="train_distributed.py")  # no colour, no terminal
    groups = _groups()
    rows: dict[str, list[list[str]]] = {name: [] for name, _, _ in groups}
    own = "train_distributed.py"
    rows[own] = []
    for action in parser._actions:
        group = next((name for name, _, fields in groups if action.dest in fields), own)
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        rows[group].append([code(invocation), text(help_text)])
    sections = [
        "Every option of `train_distributed.py` is a field of "
        "`lib.training.config.TrainingConfig`: its name, default, allowed values and help live "
        "in `lib/training/settings.py`, and `lib.cli.add_config_arguments` turns each field into "
        "an option. The tables show the options as `python train_distributed.py --help` does, "
        "in the groups of the settings. Defaults are those of an empty environment: the command "
        "line takes a few from the environment (`train_distributed.environment_defaults`). "
        f"{sum(len(r) for r in rows.values())} options."
    ]
    descriptions = {name: description for name, description, _ in groups}
    descriptions[own] = "Options of the command itself, not settings of a run."
    for name, found in rows.items():
        if found:
            sections.append(
                f"## {name}\n\n{descriptions[name]}\n\n" + table(["option", "help"], found)
            )
    return page(
        "`lib/training/settings.py` through `train_distributed.py`'s parser",
        "Training options",
        *sections,
    )


# -- errors.md --------------------------------------------------------------------------------------
def _error_classes() -> list[type]:
    from ml_service.backend import errors

    found, todo = [], [errors.ServiceError]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _examples(cls: type) -> list:
    """Instances of an error class, one per form it answers in."""
    from starlette.exceptions import HTTPException

    from ml_service.backend import errors

    makers: dict[type, Callable[[], list]] = {
        errors.RateLimited: lambda: [errors.RateLimited(1, "a limit")],
        errors.ModelNotReady: lambda: [errors.ModelNotReady(), errors.ModelNotReady(failed=True)],
        errors.Unready: lambda: [errors.Unready({})],
        # Starlette's own answers, through the same map as any exception
        errors.HTTPError: lambda: [
            errors.as_service_error(HTTPException(status)) for status in (404, 405)
        ],
    }
    return makers.get(cls, lambda: [cls()])()


def _openai(error) -> str:
    body = error.openai_body()["error"]
    status = error.openai_status or error.status_code
    parts = [code(status), code(body["type"])]
    if body["code"]:
        parts.append(code(body["code"]))
    return " ".join(parts)


def errors_page() -> str:
    from ml_service.backend import errors

    classes = _error_classes()
    documented = [c for c in classes if c is not errors.HTTPError]
    # the same text as the routes' OpenAPI `responses` (and, for the model routes, the app's
    # description): each status and when it is answered
    statuses = [
        [str(status), text(r["description"])]
        for status, r in errors.openapi_responses(*documented).items()
    ]
    v1 = errors.openapi_responses(*documented, openai=True)
    changed = sorted(set(v1) - {int(s[0]) for s in statuses})
    rows = []
    for cls in classes:
        for error in _examples(cls):
            headers = ", ".join(code(h) for h in sorted(error.headers()))
            reason = code(error.reason) if error.reason else "none (not a failure)"
            rows.append(
                (
                    error.status_code,
                    cls.__name__,
                    [
                        str(error.status_code),
                        code(cls.__name__),
                        code(error.detail) if cls is not errors.Unready else "the probe's body",
                        reason,
                        headers,
                        _openai(error) if cls is not errors.Unready else "",
                        text(cls.when if cls is not errors.HTTPError else docstring(cls)),
                    ],
                )
            )
    rows.sort(key=lambda r: (r[0], r[1]))
    routes = _route_statuses()
    return page(
        "`ml_service/backend/errors.py` (the error classes and `openapi_responses`)",
        "Errors",
        "Every answer other than a success comes from one map, `ml_service/backend/errors.py`: "
        "each error class carries its status, its body's `detail`, its `reason` in "
        "`ml_service_request_failures_total`, and its OpenAI form on the `/v1` routes "
        '(`{"error": {"message", "type", "param", "code"}}`). Our body is '
        '`{"detail": ..., "errors": [{"loc": [...], "msg": ...}]}` (`errors` when there is '
        "something to say about a field). FastAPI's 422 never reaches a client, and no answer "
        "carries a traceback.",
        "## Statuses\n\nWhat each status means, as the API description (`/docs`) says it.\n\n"
        + table(["status", "when"], statuses)
        + (
            "\n\nOn `/v1` (OpenAI's shape) the statuses follow the ecosystem's: also "
            + ", ".join(code(s) for s in changed)
            + " (see the classes below)."
            if changed
            else ""
        ),
        "## The error classes\n\nOne row per class and form; `reason` is the label of "
        "`ml_service_request_failures_total`; `/v1` gives the status, `type` and `code` of the "
        "OpenAI-shaped answer.\n\n"
        + table(
            ["status", "class", "detail", "reason", "headers", "/v1: status, type, code", "when"],
            [r[2] for r in rows],
        ),
        "## Statuses per route\n\nFrom the app's OpenAPI description (`GET /openapi.json`): the "
        "statuses besides 200 that each route documents.\n\n"
        + table(["route", "statuses"], routes),
    )


def _route_statuses() -> list[list[str]]:
    from ml_service.backend.app import create_app

    spec = create_app(_app_settings()).openapi()  # no lifespan: nothing is loaded
    rows = []
    for path, methods in sorted(spec["paths"].items()):
        for method, op in sorted(methods.items()):
            found = sorted(int(s) for s in op.get("responses", {}) if s.isdigit() and s != "200")
            if found:
                rows.append([code(f"{method.upper()} {path}"), ", ".join(str(s) for s in found)])
    return rows


# -- metrics.md -------------------------------------------------------------------------------------
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def _app_settings():
    """The settings of a replica as the tests build one: the committed default model, loaded in
    this process before the app answers (tests/conftest.py), and nothing from the environment."""
    from lib.presets import DEFAULT_CHECKPOINT
    from ml_service.settings import Settings

    return _declared_defaults(Settings)(
        checkpoint=DEFAULT_CHECKPOINT, engine="thread", background_load=False
    )


def scrape() -> tuple[str, object]:
    """`GET /metrics` of a replica serving the committed default model, and its registry."""
    from fastapi.testclient import TestClient

    from ml_service.backend.app import create_app

    access = logging.getLogger("ml_service.access")
    level = access.level
    with TestClient(create_app(_app_settings())) as client:
        access.setLevel(logging.WARNING)  # the scrape's own access line stays off the output
        try:
            response = client.get("/metrics")
        finally:
            access.setLevel(level)
        response.raise_for_status()
        return response.text, client.app.state.deps.metrics.registry


def metrics_page() -> str:
    from prometheus_client.parser import text_string_to_metric_families

    exported, registry = scrape()
    families = {f.name: f for f in text_string_to_metric_families(exported)}
    # prometheus_client also exports a `<name>_created` gauge (the series' creation time) for
    # every labelled child of a counter or histogram: shown with its family, not on its own
    created = {
        name
        for name, f in families.items()
        if name.endswith("_created")
        and f.type == "gauge"
        and getattr(families.get(name.removesuffix("_created")), "type", None)
        in ("counter", "histogram")
    }
    # the declared labels: a labelled metric that has seen nothing yet exports no sample to
    # read them from (prometheus_client keeps them on the collector)
    collectors = registry._names_to_collectors
    rows = []
    for name in sorted(set(families) - created):
        family = families[name]
        declared = tuple(getattr(collectors.get(name), "_labelnames", ()))
        seen = {k for s in family.samples for k in s.labels} - {"le", "quantile"}
        if not seen <= set(declared):
            raise ValueError(f"{name}: labels {sorted(seen)} not declared ({declared})")
        series = ", ".join(code(name + s) for s in SUFFIXES.get(family.type, ("",)))
        rows.append(
            [
                series,
                code(family.type),
                ", ".join(code(label) for label in declared) or "none",
                text(family.documentation),
            ]
        )
    platform = [n for n in families if n.startswith(("process_", "python_", "platform_"))]
    kept = (
        "It includes the process and Python collectors' families."
        if platform
        else "It has no process, Python GC or platform families: each app has a registry of "
        "its own (`ml_service.observability.ServiceMetrics`), and none of those collectors is "
        "registered in it. Nothing is left out of this table."
    )
    return page(
        "what `GET /metrics` exports (an app from `ml_service.backend.app.create_app`)",
        "Metrics",
        "Every metric family that a replica's `GET /metrics` exports (Prometheus text format), "
        "read from a scrape of an app serving the committed default model. Names follow "
        "vLLM's, with the prefix `ml_service_`; labels are the declared ones (a label set "
        f"appears once something is counted for it). {kept} Counters and histograms also export "
        "a `_created` series per label set (the time it was created; prometheus_client's "
        f"default). {len(rows)} families.",
        table(["series", "type", "labels", "help"], rows),
    )


# -- the pages --------------------------------------------------------------------------------------
PAGES: dict[str, Callable[[], str]] = {
    "settings.md": settings_page,
    "training-flags.md": training_flags_page,
    "errors.md": errors_page,
    "metrics.md": metrics_page,
}


def render(name: str) -> str:
    return PAGES[name]()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when a committed page differs")
    args = p.parse_args(argv)
    stale = []
    for name in PAGES:
        path = REFERENCE_DIR / name
        content = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
