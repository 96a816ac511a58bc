"""Structured outputs: a row's text constrained to a JSON schema, a regex, a list of choices or a
grammar, on llguidance (BENCHMARKS.md and docs/experiments/2026-12-grammar-engines.md say why
that library).

`Constraint` is the description a request carries (`GenerationParams.constraint`): plain data,
picklable (it crosses the engine process's pipe) and hashable (a frozen dataclass: the response
cache keys on it). llguidance compiles it against the tokenizer (`GrammarCompiler`, one per
tokenizer and vocabulary width, built once: making llguidance's tokenizer takes tens to hundreds of
milliseconds); `check` refuses what cannot be compiled or cannot start with any token of the
vocabulary (`InvalidConstraint`, before the request reaches an engine); `matcher` gives each row
its own `RowMatcher` (a copy of the compiled grammar's initial state, so one schema is compiled
once for all the rows that use it); `forbidden` gives what a step's constrained rows may not
take next. JSON is generated compact (no whitespace between tokens) unless the schema's own
`x-guidance` options say otherwise: a small model given free whitespace may spend its whole
budget on it.

This module imports no torch (the public types import it) and llguidance only when a constraint
is compiled.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# applied before the schema's own `x-guidance` options (which may turn whitespace back on)
JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_CONSTRAINT_CHARS = 64_000  # a schema, regex or grammar longer than this is refused
TEMPLATES_PER_TOKENIZER = 128  # compiled constraints kept (LRU), errors included


class InvalidConstraint(ValueError):
    """A constraint that cannot be used: not valid (a schema, a regex, a grammar), a keyword the
    library does not implement, an empty choice list, or nothing the vocabulary can write.
    `field` names what was wrong in the request's terms (`json`, `regex`, `choice`, `grammar`)."""

    def __init__(self, msg: str, field: str = ""):
        super().__init__(msg)
        self.field = field


@dataclass(frozen=True)
class Constraint:
    """What a row's text must match. `kind`: `json_object` (any JSON object), `json_schema`
    (`text`: the schema, as JSON text), `regex` (`text`: the pattern, matched in full), `choice`
    (`text`: a JSON list of the strings) or `grammar` (`text`: a Lark grammar, or GBNF). Build
    one with the class methods, which normalise the text."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"constraint kind must be one of {', '.join(KINDS)}, not {self.kind!r}"
            )
        if not isinstance(self.text, str):
            raise TypeError("a constraint's text is a string")

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        """A schema as a mapping or as JSON text (text that is not JSON is kept as it is, and
        `check` refuses it)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                return cls("json_schema", schema)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices) -> Constraint:
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    @property
    def field(self) -> str:
        """The request field (vLLM's `structured_outputs` names) this kind is given by."""
        return {"json_object": "json", "json_schema": "json"}.get(self.kind, self.kind)

    def choices(self) -> list[str]:
        return json.loads(self.text) if self.kind == "choice" else []


def _grammar_text(c: Constraint) -> str:
    """llguidance's grammar for `c` (not yet compiled: the matcher compiles it)."""
    import llguidance

    if len(c.text) > MAX_CONSTRAINT_CHARS:
        raise InvalidConstraint(
            f"has {len(c.text)} characters; the limit is {MAX_CONSTRAINT_CHARS}", c.field
        )
    match c.kind:
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=JSON_DEFAULTS
            )
        case "json_schema":
            try:
                schema = json.loads(c.text)
            except ValueError as e:
                raise InvalidConstraint(f"the schema is not valid JSON: {e}", c.field) from None
            if not isinstance(schema, dict | bool):
                raise InvalidConstraint("a JSON schema is an object (or true/false)", c.field)
            return llguidance.LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_DEFAULTS)
        case "regex":
            return llguidance.LLMatcher.grammar_from_regex(c.text)
        case "choice":
            choices = c.choices()
            if not choices:
                raise InvalidConstraint(
                    "the choice list is empty: give at least one string", "choice"
                )
            if not all(isinstance(s, str) for s in choices):
                raise InvalidConstraint("the choices must be strings", "choice")
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(s, ensure_ascii=False) for s in choices)
            )
        case _:  # grammar: Lark, or GBNF (converted)
            try:
                return llguidance.grammar_from("grammar", c.text)
            except ValueError as e:
                raise InvalidConstraint(str(e), c.field) from None


def _tidy(message: str, limit: int = 400) -> str:
    """llguidance's error text on one line, bounded."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GrammarCompiler:
    """Constraints compiled against one tokenizer and vocabulary width (the model's logits may be
    wider than the tokenizer's vocabulary: those ids are never allowed). Thread-safe: the
    preparing thread checks requests while the engine's thread makes matchers."""

    def __init__(self, raw_tokenizer, eos: int, vocab: int):
        import llguidance

        # what llguidance.hf.from_tokenizer does, from the Rust tokenizer itself (no transformers)
        backend = copy.copy(raw_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=eos)
        self.eos, self.vocab = eos, vocab
        self.words = (vocab + 31) // 32  # int32 words of one row's bitmask
        self._templates: OrderedDict[Constraint, object] = OrderedDict()
        self._lock = threading.Lock()

    def _template(self, c: Constraint):
        """The compiled initial state of `c` (an LLMatcher never advanced), or the
        InvalidConstraint it gives, both kept (LRU)."""
        with self._lock:
            if (found := self._templates.get(c)) is not None:
                self._templates.move_to_end(c)
        if found is None:
            found = self._compile(c)
            with self._lock:
                self._templates[c] = found
                while len(self._templates) > TEMPLATES_PER_TOKENIZER:
                    self._templates.popitem(last=False)
        if isinstance(found, InvalidConstraint):
            raise InvalidConstraint(str(found), found.field)
        return found

    def _compile(self, c: Constraint):
        import llguidance

        try:
            grammar = _grammar_text(c)
        except InvalidConstraint as e:
            return e
        except ValueError as e:  # llguidance: an argument that is not valid JSON
            return InvalidConstraint(_tidy(str(e)), c.field)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return InvalidConstraint(_tidy(matcher.get_error()), c.field)
        # the first step's mask: some token must be allowed (or the grammar takes the empty text)
        probe = matcher.deep_copy()
        mask = np.zeros((1, self.words), dtype=np.int32)
        probe.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        allowed = _unpack(mask, self.vocab)[0]
        allowed[self.eos] = False
        if probe.is_error() or not (allowed.any() or probe.is_accepting()):
            return InvalidConstraint(
                "no text that this vocabulary can write matches it (no token can start it)",
                c.field,
            )
        return matcher

    def check(self, c: Constraint) -> None:
        """InvalidConstraint unless `c` compiles and some token of the vocabulary can start it."""
        self._template(c)

    def matcher(self, c: Constraint) -> RowMatcher:
        """A new row's matcher for `c` (InvalidConstraint if it cannot be compiled)."""
        return RowMatcher(self._template(c).deep_copy())

    def forbidden(self, matchers: list[RowMatcher]) -> np.ndarray:
        """(n, vocab) bool: the tokens each matcher forbids next (the end of the document is
        allowed where the text so far is complete)."""
        words = np.zeros((len(matchers), self.words), dtype=np.int32)
        row_bytes = self.words * 4
        for i, m in enumerate(matchers):
            m.inner.unsafe_compute_mask_ptr(words.ctypes.data + i * row_bytes, row_bytes)
        return _unpack(np.invert(words), self.vocab)


def _unpack(words: np.ndarray, vocab: int) -> np.ndarray:
    """llguidance's bitmask (n, words) int32, token t at bit t % 32 of word t // 32, as
    (n, vocab) bool (little-endian words: bit t % 8 of byte t // 8)."""
    bits = np.unpackbits(words.view(np.uint8), axis=1, count=vocab, bitorder="little")
    return bits.view(np.bool_)


class RowMatcher:
    """One row's place in its grammar: the mask of what may come next, and the tokens taken."""

    def __init__(self, inner):
        self.inner = inner  # an llguidance LLMatcher

    def consume(self, token: int) -> bool:
        """Take the row's chosen token; False if the grammar refuses it (it never should: the
        token was chosen under the mask)."""
        return self.inner.consume_token(token)

    @property
    def complete(self) -> bool:
        """The text matches and nothing more can follow (only the end of the document)."""
        return self.inner.is_stopped() and not self.inner.is_error()

    @property
    def error(self) -> str:
        return self.inner.get_error()


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(raw_tokenizer, eos: int, vocab: int) -> GrammarCompiler:
    """The `GrammarCompiler` of a Rust tokenizer (`tokenizer.backend_tokenizer`) and vocabulary
    width, built on first use and kept while the tokenizer lives (one per engine, not one per
    request)."""
    with _COMPILERS_LOCK:
        by_width = _COMPILERS.setdefault(raw_tokenizer, {})
        found = by_width.get((eos, vocab))
    if found is None:
        built = GrammarCompiler(raw_tokenizer, eos, vocab)
        with _COMPILERS_LOCK:
            found = by_width.setdefault((eos, vocab), built)
    return found


def check_constraint(tokenizer, constraint: Constraint | None, vocab: int) -> None:
    """InvalidConstraint unless `constraint` (None: nothing to check) compiles against the
    tokenizer (a `transformers` fast tokenizer) and some token can start it; cached, so the
    check is paid once per distinct constraint."""
    if constraint is None:
        return
    compiler_for(tokenizer.backend_tokenizer, tokenizer.eos_token_id, vocab).check(constraint)
