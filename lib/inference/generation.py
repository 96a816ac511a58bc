"""Batched autoregressive decoding: a running batch that sequences join and leave at any step.

`DecodeBatch` holds the sequences being generated, one KV-cache slot each (`decoder.py`). `admit`
runs the prompts of new sequences and gives them their first token; `step` gives every running
sequence its next token; a sequence that ends (end of document, stop string, token budget,
cancellation) leaves at once and frees its slot. Every row carries its own temperature, top-k,
top-p, repetition/presence/frequency penalties, logit bias, seed, stop strings and budget, and
samples with its own `torch.Generator`, so a seeded or greedy request gives the same text alone or
in any company. Text is detokenised incrementally, so pieces can be streamed as they are generated.
A row that asks for `logprobs` gets, for each token, its raw log-probability and the best
alternatives (`TokenLogprob`), computed for the rows that ask only. A row with a `constraint`
(structured outputs: `constraints.py`) has the tokens its grammar forbids masked in its logits row
(the other rows of the step pay nothing), and ends with "stop" once its text is complete.

A row's own state is `rows.py`'s; `offline.generate()` runs a fixed list of prompts to the end
(library use, training samples); the serving engine (`engine.py`) feeds the same `DecodeBatch` from
a queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from lib.inference import decoder as decoder_module
from lib.inference.adapters import AdapterBank, AdapterNotFound, RowAdapters
from lib.inference.constraints import compiler_for
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.prefix_cache import BLOCK as PREFIX_BLOCK
from lib.inference.prefix_cache import PrefixCache
from lib.inference.rows import GenerationRequest, Row, first_stop, token_logprobs
from lib.inference.sampling import SamplingTensors, sample_next
from lib.inference.types import (
    GenerationFailed,
    GenerationResult,
    TokenLogprob,
)

log = logging.getLogger(__name__)
NON_FINITE = "the model's probabilities for this sequence were not finite (NaN or infinity)"


class DecodeBatch:
    """The running batch: up to `max_rows` sequences, each in its own KV-cache slot."""

    def __init__(
        self,
        model,
        tokenizer,
        max_rows: int,
        observer=None,
        prefix_cache_bytes: int = 0,
        adapter_bytes: int = 0,
        base_sha256: str | None = None,
    ):
        if hasattr(model, "slot_decoder"):  # a model run by another runtime (onnx_model.py)
            self.decoder = model.slot_decoder()
        else:
            # oneDNN's reordered weight copies (decoder.py) pay for themselves in batches of
            # PREPACK_MIN_ROWS rows or more; a smaller batch (a few prompts run to the end) skips
            # the reorder's cost and oneDNN reads the plain weights (the same sums)
            prepack = max_rows >= decoder_module.PREPACK_MIN_ROWS
            self.decoder = GPT2SlotDecoder(model, prepack=prepack)
        self.raw = tokenizer.backend_tokenizer  # the Rust tokenizer: batch decoding in one call
        self.eos = tokenizer.eos_token_id
        self.vocab = model.config.vocab_size
        self.max_rows = max_rows
        self.observer = observer
        self.rows: list[Row] = []
        # each row's tokens so far (prompt, then generated), padded with its first prompt token:
        # what the repetition penalty looks at (a repeated id changes nothing)
        # (one column more than the context: the last new token is recorded, never fed back)
        self.history = torch.full(
            (0, self.decoder.context + 1), self.eos, dtype=torch.long, device=self.decoder.device
        )
        self._sampling: SamplingTensors | None = None  # for all rows; rebuilt when rows change
        # the KV of prompt prefixes, kept after their rows end (prefix_cache.py); only where the
        # decoder can run the rest of a prompt after a cached start (not ONNX Runtime's graph)
        d = self.decoder
        budget = prefix_cache_bytes if getattr(d, "prefix_cacheable", False) else 0
        self.prefix = PrefixCache(d.layers, d.n_head, d.head_dim, d.dtype, d.device, budget)
        self._evictions_told = 0  # evictions the observer has heard of
        # LoRA adapters, many in one step (adapters.py); only over our own decoder's products
        bank_budget = adapter_bytes if isinstance(d, GPT2SlotDecoder) else 0
        self.adapters = AdapterBank(model, bank_budget, base_sha256)
        self._lora: RowAdapters | None = None  # the running rows' updates; rebuilt with the rows
        self._lora_stale = True

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()
    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Process the prompts of new sequences (at most `free`) and sample their first tokens.

        If that raises, each new prompt is tried alone: those that fail alone fail, the others
        are admitted (the error is raised only when no single prompt can be blamed)."""
        assert len(requests) <= self.free, "more requests than free rows"
        self._mlp_form()
        for r in requests:
            if r.cancelled:
                logprobs = [] if r.params.logprobs is not None else None
                cancelled = GenerationResult("", "cancelled", r.prompt_tokens, 0, [], logprobs)
                self.finish_request(r, cancelled)
        requests = [r for r in requests if not r.cancelled]
        if not requests:
            return
        # prompts that begin alike, none of it cached yet: one of each kind runs first, and the
        # others then find their common start in the prefix cache
        for r in list(requests):  # a request for an adapter that is not (or no longer) loaded
            name = r.params.adapter
            if name is not None and (
                name not in self.adapters.adapters or name in self.adapters.retiring
            ):
                self.finish_request(r, AdapterNotFound(name))
                requests.remove(r)
        if not requests:
            return
        spaces = [self._namespace(r) for r in requests]
        leaders = self.prefix.leaders([r.prompt_ids for r in requests], spaces)
        if leaders and len(requests) > 1:
            self.admit([requests[i] for i in leaders])
            chosen = set(leaders)
            self.admit([r for i, r in enumerate(requests) if i not in chosen])
            return
        first, n = len(self.rows), len(requests)
        need = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        self.decoder.reserve(first + n, need)
        if self.history.shape[0] < first + n:
            grown = self.history.new_full((self.max_rows, self.history.shape[1]), self.eos)
            grown[: len(self.rows)] = self.history[: len(self.rows)]
            self.history = grown
        for i, r in enumerate(requests):
            self.history[first + i].fill_(r.prompt_ids[0])
            self.history[first + i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        new_rows = [Row(r) for r in requests]
        history = self.history[first : first + n]
        cached = [0] * n
        if self.prefix.enabled:  # the longest cached start of each prompt, copied into its slot
            for i, row in enumerate(new_rows):
                places = self.prefix.lookup(row.request.prompt_ids, spaces[i])
                self.prefix.load(places, self.decoder.k, self.decoder.v, first + i)
                cached[i] = len(places) * PREFIX_BLOCK
                # (the leading end-of-document token is not one of the prompt's tokens)
                row.cached_tokens = max(0, cached[i] - 1)

        def prompt_alone(i: int) -> None:
            lora = self.adapters.rows([requests[i].params.adapter])
            logits = self.decoder.prefill([new_rows[i].request.prompt_ids], first, lora=lora)
            self._choose([new_rows[i]], logits, history[i : i + 1])

        try:
            lora = self.adapters.rows([r.params.adapter for r in requests])
            logits = self.decoder.prefill([r.prompt_ids for r in requests], first, cached, lora)
            chosen = self._choose(new_rows, logits, history)
        except Exception as error:
            culprits = self._culprits(error, new_rows, prompt_alone)
            for row in culprits:
                self.finish_request(row.request, row.failure)
            self.admit([row.request for row in new_rows if row.failure is None])
            return
        for i, row in enumerate(new_rows):  # the prompts' whole blocks, for later requests
            ids = row.request.prompt_ids
            self.prefix.store(ids, self.decoder.k, self.decoder.v, first + i, spaces[i])
            if row.params.adapter is not None:
                self.adapters.acquire(row.params.adapter)  # held until the row ends
        self._lora_stale = True
        if self.observer is not None and self.prefix.enabled:
            stats = self.prefix.stats
            self.observer.on_prefix_cache(
                sum(r.prompt_tokens for r in requests),
                sum(row.cached_tokens for row in new_rows),
                stats.evictions - self._evictions_told,
                stats.blocks,
            )
            self._evictions_told = stats.evictions
        self.rows.extend(new_rows)
        self._sampling = None
        self._apply(first, *chosen)

    @torch.inference_mode()
    def step(self) -> None:
        """One new token for every running sequence; finished ones leave.

        If the step raises, each row is tried alone: those that fail alone leave with the error
        and the step is run again for the others (raised only when no single row can be blamed)."""
        self._mlp_form()
        cancelled = [i for i, row in enumerate(self.rows) if row.request.cancelled]
        for i in cancelled:
            self.rows[i].finish_reason = "cancelled"
        self._remove_finished()
        if not self.rows:
            return
        ids = torch.tensor([row.generated[-1] for row in self.rows])
        positions = [row.position for row in self.rows]

        if self._lora_stale:
            self._lora = self.adapters.rows([row.params.adapter for row in self.rows])
            self._lora_stale = False

        def row_alone(i: int) -> None:
            lora = self.adapters.rows([self.rows[i].params.adapter])
            logits = self.decoder.decode(ids[i : i + 1], positions[i : i + 1], [i], lora)
            self._choose([self.rows[i]], logits, self.history[i : i + 1])

        try:
            logits = self.decoder.decode(ids, positions, lora=self._lora)
            if self._sampling is None:
                self._sampling = SamplingTensors.build(
                    [row.params for row in self.rows], self.vocab, logits.device
                )
            chosen = self._choose(self.rows, logits, self.history, self._sampling)
        except Exception as error:
            self._culprits(error, self.rows, row_alone)
            self._remove_finished()
            self.step()  # the others: their caches are rewritten with the same values
            return
        self._apply(0, *chosen)

    def fail(self, error: BaseException) -> None:
        """End every running sequence with `error` (the model raised)."""
        rows, self.rows, self._sampling = self.rows, [], None
        self._lora_stale = True
        for row in rows:
            if row.params.adapter is not None:
                self.adapters.release(row.params.adapter)
            self.finish_request(row.request, error)
        self.decoder.release()

    def fail_requests(self, requests: Sequence[GenerationRequest], error: BaseException) -> None:
        """End `requests` with `error`, running or not; the other rows go on."""
        for row in self.rows:
            if row.request in requests:
                row.fail(error)
        self._remove_finished()
        for r in requests:
            if not r.done:
                self.finish_request(r, error)

    def finish_request(
        self, request: GenerationRequest, outcome: GenerationResult | BaseException
    ) -> None:
        request.finish(outcome)
        if self.observer is not None:
            self.observer.on_finished(request)

    # -- internals ----------------------------------------------------------------------------
    def _mlp_form(self) -> None:
        """While adapters are loaded every row's MLP runs unfused (decoder.unfused_mlp)."""
        if self.adapters.budget > 0:
            self.decoder.unfused_mlp = bool(self.adapters.adapters)

    def _namespace(self, request: GenerationRequest) -> str:
        """What besides its tokens a row's KV depends on, for the prefix cache: its adapter (by
        name and content)."""
        name = request.params.adapter
        return "" if name is None else f"{name}:{self.adapters.adapters[name].sha256}"

    def _culprits(self, error: Exception, rows: list[Row], alone: Callable[[int], None]) -> list:
        """The rows for which `alone(i)` raises too, marked failed; `error` is raised again when
        there are none (the failure cannot be pinned on a row, so it is the whole batch's)."""
        culprits = []
        for i, row in enumerate(rows):
            try:
                alone(i)
            except Exception as e:
                row.fail(GenerationFailed(str(e)))
                culprits.append(row)
        if not culprits:
            raise error
        log.error(
            "a step of %d rows failed (%s: %s); %d row(s) that fail alone leave, the rest go on",
            len(rows),
            type(error).__name__,
            error,
            len(culprits),
        )
        return culprits

    def _choose(
        self,
        rows: list[Row],
        logits: torch.Tensor,
        history: torch.Tensor,
        sampling: SamplingTensors | None = None,
    ) -> tuple[list[Row], torch.Tensor, torch.Tensor, dict[int, TokenLogprob] | None]:
        """The next token of each row (one logits row each), which rows' numbers were not finite,
        and the chosen tokens' log-probabilities of the rows that ask (by place in `rows`).
        Changes no state (the logits aside): a retried step chooses the same tokens. The counts
        of the presence/frequency penalties are read from `history`, which only `_apply` writes."""
        if sampling is None:
            sampling = SamplingTensors.build([r.params for r in rows], self.vocab, logits.device)
        raw = None
        if sampling.logprob_rows is not None:  # from the raw logits, before anything changes them
            asking = logits if sampling.logprob_all else logits[sampling.logprob_rows]
            raw = torch.log_softmax(asking, dim=-1, dtype=torch.float32)
        constrained = [i for i, row in enumerate(rows) if row.params.constraint is not None]
        if constrained:  # their grammars' masks, before penalties and sampling
            self._mask(logits, [rows[i] for i in constrained], constrained)
        early = [  # (a constrained row may end whenever its grammar allows it)
            i
            for i, row in enumerate(rows)
            if row.params.constraint is None
            and (len(row.generated) < row.params.min_new_tokens or row.params.ignore_eos)
        ]
        if early:  # no end of document before min_new_tokens, nor ever with ignore_eos
            logits[early, self.eos] = -torch.inf
        seen = max(row.position + 1 for row in rows)  # tokens so far, over the rows
        spans = None
        if sampling.any_counts:  # where each row's generated tokens lie in its history
            spans = torch.tensor([[len(row.request.prompt_ids), row.position + 1] for row in rows])

        def uniforms() -> torch.Tensor:  # greedy rows draw nothing
            return torch.tensor(
                [0.0 if row.params.temperature <= 0 else row.peek_uniform() for row in rows]
            )

        tokens, bad = sample_next(logits, history[: len(rows), :seen], sampling, uniforms, spans)
        picked = None if raw is None else token_logprobs(raw, tokens, sampling)
        return rows, tokens, bad, picked

    def _mask(self, logits: torch.Tensor, rows: list[Row], places: list[int]) -> None:
        """-inf, in place, at the tokens each constrained row's grammar forbids next (`places`:
        those rows' logits rows). A row's matcher is made at its first step, from the compiled
        grammar its tokenizer keeps. InvalidConstraint (a constraint nobody checked) or a grammar
        that allows no token fails that row alone (see `_culprits`)."""
        compiler = compiler_for(self.raw, self.eos, self.vocab)
        for row in rows:
            if row.matcher is None:
                row.matcher = compiler.matcher(row.params.constraint)
        forbidden = compiler.forbidden([row.matcher for row in rows])  # (n, vocab) bool
        if forbidden.all(axis=1).any():  # a grammar that this vocabulary cannot go on with
            raise GenerationFailed("the constraint allows no token of the vocabulary here")
        forbidden = torch.from_numpy(forbidden).to(logits.device)
        for j, place in enumerate(places):  # each row's view, in place: no gather or scatter
            logits[place].masked_fill_(forbidden[j], -torch.inf)

    def _apply(
        self,
        first: int,
        rows: list[Row],
        tokens: torch.Tensor,
        bad: torch.Tensor,
        logprobs: dict[int, TokenLogprob] | None = None,
    ) -> None:
        """Give rows first.. their chosen tokens (and log-probabilities), then update text and
        state."""
        for row in rows:
            if row.params.temperature > 0:
                row.use_uniform()
        lengths = [row.position + 1 for row in rows]  # tokens so far: the next one's column
        # recorded for every row (one that just ended leaves before it matters); prompt plus
        # max_new_tokens fits the context (check_fits), so the column is always inside it
        self.history[first : first + len(rows)].scatter_(
            1, torch.tensor(lengths)[:, None], tokens[:, None]
        )
        next_ids = tokens.tolist()
        failed = set(bad.nonzero()[:, 0].tolist()) if bad.any() else ()
        now = time.monotonic()
        grew: list[Row] = []
        gaps: list[float] = []
        for i, (row, tok) in enumerate(zip(rows, next_ids, strict=True)):
            if i in failed:  # its numbers were not finite: it leaves alone, the others go on
                row.fail(GenerationFailed(NON_FINITE))
                continue
            if tok == self.eos:
                # a constrained row may end only where its grammar is complete
                row.complete = row.matcher is not None
                row.finish_reason = "stop" if row.complete else "eos"
                continue
            if row.matcher is not None:
                if not row.matcher.consume(tok):  # it never should: tok was chosen under the mask
                    row.fail(
                        GenerationFailed(f"the grammar refused token {tok}: {row.matcher.error}")
                    )
                    continue
                row.complete = row.matcher.complete
            row.generated.append(tok)
            if logprobs is not None and i in logprobs:
                row.logprobs.append(logprobs[i])
            if row.request.first_token_at is None:
                row.request.first_token_at = now
            else:
                gaps.append(now - row.last_token_at)
            row.last_token_at = now
            grew.append(row)
        if failed:
            log.warning("%d row(s) had non-finite probabilities and failed alone", len(failed))
        if self.observer is not None:
            self.observer.on_tokens(len(grew), gaps)
        self._detokenize(grew)
        for row in grew:
            cut = first_stop(row.text, row.params.stop)
            if cut is not None:
                row.text, row.finish_reason = row.text[:cut], "stop"
                row.complete = False  # cut by a stop string: not the grammar's whole text
            elif row.complete:  # its grammar allows nothing more (even at the token budget)
                row.finish_reason = "stop"
            elif len(row.generated) >= row.params.max_new_tokens:
                row.finish_reason = "length"
        for row in grew:
            if row.finish_reason is None:
                self._emit(row, len(row.text) - row.hold_back)
        self._remove_finished()

    def _detokenize(self, rows: list[Row]) -> None:
        """Append to each row's text what its new token completes (nothing for half a character)."""
        if not rows:
            return
        windows = []
        for row in rows:
            windows.append(row.generated[row.prefix_offset : row.read_offset])
            windows.append(row.generated[row.prefix_offset :])
        decoded = self.raw.decode_batch(windows, skip_special_tokens=True)
        for j, row in enumerate(rows):
            before, after = decoded[2 * j], decoded[2 * j + 1]
            if len(after) > len(before) and not after.endswith("\ufffd"):
                row.text += after[len(before) :]
                row.prefix_offset, row.read_offset = row.read_offset, len(row.generated)

    def _emit(self, row: Row, upto: int) -> None:
        if upto > row.emitted and row.request.on_text is not None:
            row.request.on_text(row.text[row.emitted : upto])
        row.emitted = max(row.emitted, upto)

    def _remove_finished(self) -> None:
        done = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        for i in reversed(done):  # move the last row into each hole: live slots stay contiguous
            row, last = self.rows[i], len(self.rows) - 1
            if row.failure is None and self.prefix.enabled:
                # its whole sequence so far (the next turn of a chat starts with it): the KV of
                # every token before its newest (`position`: fed at the next step, if any)
                seen = (row.request.prompt_ids + row.generated)[: row.position]
                space = self._namespace(row.request)
                self.prefix.store(seen, self.decoder.k, self.decoder.v, i, space)
            if row.params.adapter is not None:
                self.adapters.release(row.params.adapter)
            if i != last:
                self.decoder.move(last, i)
                self.history[i] = self.history[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self._finish(row)
        if done:
            self._sampling = None
            self._lora_stale = True

    def _finish(self, row: Row) -> None:
        if row.failure is not None:
            self.finish_request(row.request, row.failure)
            return
        if row.finish_reason in ("eos", "length") or row.complete:
            # the whole completion, including a trailing piece the window had held back
            row.text = self.raw.decode(row.generated, skip_special_tokens=True)
        self._emit(row, len(row.text))
        r = row.request
        result = GenerationResult(
            row.text,
            row.finish_reason,
            r.prompt_tokens,
            len(row.generated),
            token_ids=list(row.generated),
            logprobs=row.logprobs,
            cached_tokens=row.cached_tokens,
        )
        self.finish_request(r, result)
