"""What every system under test is sent and how its answers are read (`System`; the systems
themselves and their server processes are in systems.py and llama_server.py).

Every system is sent the same OpenAI request, `POST /v1/completions` (a raw prompt, no chat
template), so that one client measures all of them: `prompt`, `max_tokens`, `temperature`,
`top_p`, `seed` and, streamed, `stream_options.include_usage`; then each system's extension
fields, which make it sample as the checkpoint's generation config asks (top-k 50, repetition
penalty 1.1) and hold off EOS so that every request generates exactly `max_tokens` tokens: ours
and vLLM take `top_k`, `repetition_penalty` and `ignore_eos`; `transformers serve` refuses
unknown fields and takes its own `generation_config` instead; llama-server ignores unknown fields
and has its own names (`repeat_penalty`...). A server that refuses an extension field at warm-up
is sent the request without it (`System.negotiate`), and its rows show the cost: a response
shorter than asked counts as an error."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
COMPLETIONS = "/v1/completions"
TEMPERATURE = 0.8
TOP_P = 0.95
TOP_K = 50
REPETITION_PENALTY = 1.1


@dataclass
class RequestResult:
    ok: bool
    latency: float
    completion_tokens: int = 0
    ttft: float | None = None
    error: str = ""
    prompt_tokens: int = 0


def _checked(latency: float, usage: dict, expected: int, ttft: float | None = None):
    tokens = int(usage["completion_tokens"])
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if tokens != expected:
        return RequestResult(
            False, latency, tokens, ttft, f"short: {tokens} of {expected} tokens", prompt_tokens
        )
    return RequestResult(True, latency, tokens, ttft, prompt_tokens=prompt_tokens)


def _http_error(status: int, text: str, latency: float) -> RequestResult:
    return RequestResult(False, latency, error=f"HTTP {status}: {text[:200]}")


def openai_body(prompt: str, seed: int, max_new: int, stream: bool, greedy: bool = False) -> dict:
    """The OpenAI part of every system's request (what any OpenAI server accepts); `greedy`:
    temperature 0 (every system's greedy decoding) and no top-p."""
    body = {"prompt": prompt, "max_tokens": max_new, "temperature": TEMPERATURE, "top_p": TOP_P}
    if greedy:
        body["temperature"] = 0.0
        del body["top_p"]
    body["seed"] = seed
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


class System:
    name: str
    description: str
    ready_path = "/health"  # answers 200 once the server can generate
    ready_timeout = 180.0  # seconds from start to ready
    path = COMPLETIONS

    def __init__(self) -> None:
        self.refused: list[str] = []  # extension fields the server refused at warm-up
        self.greedy = False  # the greedy workload (make_systems(greedy=True), --greedy)

    def unavailable(self) -> str | None:
        """Why this system cannot run here (it is skipped), or None."""
        return None

    def command(self, checkpoint: Path, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def thread_env(self, threads: int) -> dict[str, str]:
        """The environment that gives the server `threads` math threads."""
        return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        cmd = shlex.join(self.command(Path(checkpoint), 0)).replace(" --port 0", f" --port {port}")
        cmd = cmd.replace(shlex.quote(sys.executable), "python")
        return f"{env} {cmd}".strip()

    def extensions(self, max_new: int) -> dict:
        """The fields beyond OpenAI's: the checkpoint's sampling (not when greedy: plain argmax),
        and no EOS before max_new."""
        if self.greedy:
            return {"ignore_eos": True}
        return {"top_k": TOP_K, "repetition_penalty": REPETITION_PENALTY, "ignore_eos": True}

    def extensions_note(self) -> str:
        """How this system was sent the extensions (for the report)."""
        sent = [k for k in self.extensions(1) if k not in self.refused]
        note = ", ".join(f"`{k}`" for k in sent) or "none"
        if self.refused:
            note += " (refused, so not sent: " + ", ".join(f"`{k}`" for k in self.refused) + ")"
        return note

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        body = openai_body(prompt, seed, max_new, stream, self.greedy)
        body.update({k: v for k, v in self.extensions(max_new).items() if k not in self.refused})
        return body

    def read_event(self, line: str, state: dict) -> dict | None:
        """One line of an OpenAI event stream: returns the `usage` when it comes, raises
        RuntimeError for an error chunk; `state` carries what earlier lines set ("text" once a
        chunk carried text, "ended" at `[DONE]`)."""
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if payload == "[DONE]":
            state["ended"] = True
            return None
        data = json.loads(payload)
        if "error" in data:
            raise RuntimeError(f"error chunk: {data['error']}")
        choices = data.get("choices") or [{}]
        if choices[0].get("text"):
            state["text"] = True
        return data.get("usage") or None

    async def negotiate(self, client: httpx.AsyncClient, prompt: str) -> None:
        """One request with every extension field; a server that refuses it (400 or 422) is sent
        requests without the fields its error names (all of them when it names none)."""
        r = await client.post(self.path, json=self.payload(prompt, 0, 2, False))
        if r.status_code not in (400, 422):
            return
        fields = list(self.extensions(2))
        named = [f for f in fields if re.search(rf"\b{re.escape(f)}\b", r.text)]
        self.refused = named or fields
        print(
            f"[{self.name}] refused {', '.join(self.refused)} (HTTP {r.status_code}: "
            f"{r.text[:160]}): sent without them, so a response may stop at EOS",
            flush=True,
        )

    async def request(
        self, client: httpx.AsyncClient, prompt: str, seed: int, max_new: int, stream: bool
    ) -> RequestResult:
        body = self.payload(prompt, seed, max_new, stream)
        t0 = time.perf_counter()
        if stream:
            return await self._streamed(client, body, max_new, t0)
        r = await client.post(self.path, json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return _http_error(r.status_code, r.text, latency)
        return _checked(latency, r.json()["usage"], max_new)

    async def _streamed(
        self, client: httpx.AsyncClient, body: dict, max_new: int, t0: float
    ) -> RequestResult:
        state: dict = {}
        async with client.stream("POST", self.path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return _http_error(r.status_code, text, time.perf_counter() - t0)
            async for line in r.aiter_lines():
                try:
                    usage = self.read_event(line, state)
                except RuntimeError as e:
                    return RequestResult(False, time.perf_counter() - t0, error=str(e))
                if state.get("text") and "ttft" not in state:
                    state["ttft"] = time.perf_counter() - t0
                if usage is not None:
                    return _checked(time.perf_counter() - t0, usage, max_new, state.get("ttft"))
                if state.get("ended"):
                    break
        return RequestResult(False, time.perf_counter() - t0, error="stream ended without usage")
