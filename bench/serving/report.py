"""The report: the machine line, a row's progress line, the measured ratios (only measured: the
targets they are read against are stated in BENCHMARKS.md), the markdown Serving section and
`replace_section`, which puts it in BENCHMARKS.md, and the plot."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path

from .llama_server import LLAMA_OUTTYPES, LlamaCpp
from .systems import COMPLETIONS, TEMPERATURE, TOP_K, TOP_P, TransformersServe, VllmCpu

SECTION_START = "<!-- serve_bench:start -->"
SECTION_END = "<!-- serve_bench:end -->"
HEADING = f"## Serving through {COMPLETIONS}"


def markers(key: str = "") -> tuple[str, str]:
    """The start and end markers of the section named `key` ("": the default model's)."""
    if not key:
        return SECTION_START, SECTION_END
    return f"<!-- serve_bench:start {key} -->", f"<!-- serve_bench:end {key} -->"


def _threads(threads: int | None, systems) -> str:
    vllm = any(isinstance(s, VllmCpu) for s in systems)
    llama = any(isinstance(s, LlamaCpp) for s in systems)
    if threads:
        return (
            f"every server with {threads} math threads (OMP_NUM_THREADS / "
            f"ML_SERVICE_TORCH_THREADS={threads}"
            + (
                f"; vLLM: VLLM_CPU_OMP_THREADS_BIND, its threads bound to {threads} cores"
                if vllm
                else ""
            )
            + (f"; llama.cpp: `--threads {threads}` (LLAMA_ARG_THREADS)" if llama else "")
            + ")"
        )
    return (
        "every server with its default threads (`transformers serve`: torch's, all "
        f"{os.cpu_count()} cores; ours: by the model's size, every core from 10 M parameters, "
        "else all but one, left to HTTP"
        + (
            "; vLLM: its automatic binding, all cores but one, which it keeps for its scheduler"
            if vllm
            else ""
        )
        + ("; llama.cpp: its own default `--threads`" if llama else "")
        + ")"
    )


def machine_info(
    threads: int | None, device: str = "cpu", dtype: str = "float32", systems=()
) -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)} ({dtype} weights) with {cpu}"
    else:
        where = f"{cpu}, {os.cpu_count()} cores ({platform.machine()}), no GPU"
        where += f" ({dtype} weights)" if dtype != "float32" else ""
    versions = [s.versions() for s in systems if isinstance(s, VllmCpu | LlamaCpp)]
    peers = "".join(f", {v}" for v in dict.fromkeys(versions))  # llama.cpp's two: one build
    return (
        f"{where}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}{peers}; "
        + _threads(threads, systems)
        + "; one server at a time; the client is one asyncio + httpx process"
    )


def format_line(s: dict) -> str:
    """One row's summary as a progress line."""
    load = f"c={s['load']:g}" if s["mode"] == "closed" else f"rate={s['load']:g}/s"
    ttft = f" ttft50={s['ttft_p50'] * 1e3:.0f}ms" if s["ttft_p50"] is not None else ""
    tpot = f" tpot50={s['tpot_p50'] * 1e3:.1f}ms" if s["tpot_p50"] is not None else ""
    errs = f" errors={s['errors']}" + (f" {s['error_samples']}" if s["errors"] else "")
    if "cpu_other" in s:
        errs += (
            f" cpu: server {s['cpu_server']:.0%} client {s['cpu_client']:.0%}"
            f" other {s['cpu_other']:.0%}"
        )
    return (
        f"  {s['system']:<13} {load:<12} n={s['requests']:<4} {s['tok_s']:8.1f} tok/s "
        f"{s['req_s']:6.2f} req/s  p50={s['lat_p50']:.2f}s p95={s['lat_p95']:.2f}s "
        f"p99={s['lat_p99']:.2f}s{ttft}{tpot}{errs}"
    )


# --------------------------------------------------------------------------------------------
# ratios


def _ratio_line(c: int, ours: dict, peer: dict, what: str) -> str:
    clients = "1 client" if c == 1 else f"{c} clients"
    if not peer["tok_s"]:  # every request failed (the table shows its errors)
        return f"- {clients}, ours / {what}: no ratio, {what} answered no request"
    return (
        f"- {clients}, ours / {what}: throughput {ours['tok_s'] / peer['tok_s']:.2f}x, "
        f"p95 latency {ours['lat_p95']:.2f}s vs {peer['lat_p95']:.2f}s"
    )


def _ratios_at(closed: dict, c: int) -> list[str]:
    """At `c` clients: ours against the best `transformers serve` row, against vLLM and against
    ours-nobatch."""
    ours = closed.get(("ours", c))
    if ours is None:
        return []
    lines = []
    peers = [closed[k] for k in (("tf-serve", c), ("tf-serve-cb", c)) if k in closed]
    if peers:
        best = max(peers, key=lambda s: s["tok_s"])
        lines.append(_ratio_line(c, ours, best, f"best `transformers serve` ({best['system']})"))
    vllm = closed.get(("vllm-cpu", c))
    if vllm is not None:
        lines.append(_ratio_line(c, ours, vllm, "vLLM CPU (vllm-cpu)"))
    for outtype in LLAMA_OUTTYPES:
        llama = closed.get((f"llama.cpp-{outtype}", c))
        if llama is not None:
            lines.append(_ratio_line(c, ours, llama, f"llama.cpp {outtype} (llama.cpp-{outtype})"))
    nob = closed.get(("ours-nobatch", c))
    if nob is not None:
        r = ours["tok_s"] / nob["tok_s"]
        lines.append(f"- {c} clients, ours / ours-nobatch throughput {r:.2f}x")
    return lines


def ratios(summaries: list[dict]) -> list[str]:
    """The measured ratios, as markdown list items; they are not judged here (the targets they
    are read against are stated in BENCHMARKS.md)."""
    closed = {(s["system"], s["load"]): s for s in summaries if s["mode"] == "closed"}
    lines = [*_ratios_at(closed, 16), *_ratios_at(closed, 64)]
    ours1, nob1 = closed.get(("ours", 1)), closed.get(("ours-nobatch", 1))
    if ours1 and ("vllm-cpu", 1) in closed:
        lines.append(_ratio_line(1, ours1, closed[("vllm-cpu", 1)], "vLLM CPU (vllm-cpu)"))
    if ours1 and nob1:
        r = ours1["lat_p50"] / nob1["lat_p50"]
        r95 = ours1["lat_p95"] / nob1["lat_p95"]
        lines.append(f"- 1 client, ours / ours-nobatch latency p50 {r:.3f} (p95 {r95:.3f})")
    errors = sum(s["errors"] for s in summaries)
    ours_errors = sum(s["errors"] for s in summaries if s["system"].startswith("ours"))
    lines.append(f"- errors: {ours_errors} in our service, {errors} in all runs")
    return lines


# --------------------------------------------------------------------------------------------
# markdown


def _ms(x):
    return "—" if x is None else f"{x * 1e3:,.0f} ms"


def _ms1(x):
    return "—" if x is None else f"{x * 1e3:.1f} ms"


def _cpu(s):
    if "cpu_other" not in s:
        return "—"
    return f"{s['cpu_server']:.0%} / {s['cpu_client']:.0%} / {s['cpu_other']:.0%}"


def _table(summaries: list[dict]) -> list[str]:
    rows = [
        f"| {s['system']} | {('' if s['mode'] == 'closed' else 'open loop, ')}"
        f"{s['load']:g}{'' if s['mode'] == 'closed' else ' req/s'} | {s['requests']} | "
        f"{s['tok_s']:,.0f} | {s['req_s']:.2f} | {s['lat_p50']:.2f} / {s['lat_p95']:.2f} / "
        f"{s['lat_p99']:.2f} | {_ms(s['ttft_p50'])} | {_ms1(s['tpot_p50'])} | {s['errors']} | "
        f"{_cpu(s)} |"
        for s in summaries
    ]
    return [
        "| system | clients | requests | output tok/s | req/s | latency p50 / p95 / p99 (s) "
        "| TTFT p50 | TPOT p50 | errors | CPU server / client / other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def _prompt_tokens(summaries: list[dict]) -> str:
    """The mean prompt length by each system's count, from its widest row (every prompt, each as
    often as the others)."""
    widest = {}
    for s in summaries:
        if s["requests"] > widest.get(s["system"], {"requests": -1})["requests"]:
            widest[s["system"]] = s
    means = {round(s["prompt_tokens_mean"], 1) for s in widest.values() if s["prompt_tokens_mean"]}
    return " / ".join(f"{m:g}" for m in sorted(means)) or "?"


def _decoding(args) -> str:
    return (
        "greedy (temperature 0)" if getattr(args, "greedy", False) else f"temperature {TEMPERATURE}"
    )


def _setup(summaries: list[dict], args, elapsed: float) -> str:
    return (
        f"Checkpoint `{args.checkpoint}`, {args.max_new_tokens} new tokens per request (exactly: "
        f"EOS is held off), {_decoding(args)}, "
        f"{'streamed (SSE)' if args.stream else 'not streamed'}, every system through "
        f"`POST {COMPLETIONS}`; "
        f"{len(args.prompts)} fixed Russian prompts from the validation split of "
        f"the bundled corpus (at most {args.prompt_chars} characters, cut at a word; "
        f"{_prompt_tokens(summaries)} prompt tokens on average, by each system's count). Closed "
        f"loop: N clients, each sending its next request when the previous one is answered, "
        f"max({args.min_requests}, {args.requests_per_client}·N) requests per row."
        + (
            f" Open loop: Poisson arrivals at R requests/s, {args.num_requests} requests per row."
            if args.rate
            else ""
        )
        + f" Whole run: {elapsed / 60:.1f} min."
    )


def _systems(systems, checkpoint: str, skipped: dict[str, str]) -> list[str]:
    return [
        "How the systems were run (each on a free port, the peers with `HF_HUB_OFFLINE=1 "
        "TRANSFORMERS_OFFLINE=1`, nothing downloaded):",
        "",
        *(f"- `{s.name}`: {s.description}: `{s.display_command(checkpoint)}`" for s in systems),
        *(f"- `{name}`: skipped: {why}" for name, why in skipped.items()),
    ]


def _short(summaries: list[dict]) -> str:
    short = [s for s in summaries if s["short"]]
    if not short:
        return " No response was short."
    return (
        " Short responses: "
        + ", ".join(f"{s['system']} at {s['load']:g}: {s['short']}" for s in short)
        + "."
    )


def _request_notes(systems, args) -> list[str]:
    n = args.max_new_tokens
    stream = (
        ' (plus `"stream": true, "stream_options": {"include_usage": true}`)' if args.stream else ""
    )
    notes = [
        f"- Every system: `POST {COMPLETIONS}` (OpenAI's legacy completions: a raw prompt, no chat "
        f'template) with the same OpenAI body `{{"prompt", "max_tokens": {n}, "temperature": '
        f'{TEMPERATURE}, "top_p": {TOP_P}, "seed": i}}`{stream}, and the fields beyond OpenAI\'s '
        f"that make each sample as the checkpoint's generation config asks (top-k {TOP_K}, "
        f"repetition penalty 1.1) and generate exactly {n} tokens, in each system's dialect:",
    ]
    if getattr(args, "greedy", False):
        notes[0] = (
            f"- Every system: `POST {COMPLETIONS}` (OpenAI's legacy completions: a raw prompt, no "
            f'chat template) with the same OpenAI body `{{"prompt", "max_tokens": {n}, '
            f'"temperature": 0, "seed": i}}`{stream} (greedy: no top-p, top-k or repetition '
            f"penalty), and the fields beyond OpenAI's that make each generate exactly {n} tokens, "
            "in each system's dialect:"
        )
    notes += [f"  - `{s.name}`: {s.extensions_note()}" for s in systems]
    if any(isinstance(s, VllmCpu) for s in systems):
        notes.append(
            "- vLLM CPU gets the body without `seed` (its server runs with `--seed 0`): vllm-cpu "
            "0.32's engine dies on seeded requests under load (`RuntimeError: CPU Generator does "
            "not use offset`, at 64 clients on the default model; every later request failed)."
        )
    if any(isinstance(s, TransformersServe) for s in systems):
        notes.append(
            "- `transformers serve` answers 422 to fields it does not know (`ignore_eos`, `top_k`, "
            "`repetition_penalty`) and takes them in `generation_config`, a JSON string that "
            "replaces the model's generation config."
            + (
                " With `--continuous-batching` it drops the logits processors it does not support "
                "(`min_new_tokens`, `repetition_penalty`): `eos_token_id: -1` makes it ignore EOS "
                "instead, and it runs without the repetition penalty the others apply."
                if any(getattr(s, "cb", False) for s in systems)
                else ""
            )
        )
    if any(isinstance(s, VllmCpu) for s in systems):
        notes.append(
            "- vLLM: `--generation-config vllm`, so that the checkpoint's `generation_config.json` "
            "(whose `max_new_tokens` would cap every request) is not read: every sampling "
            f"parameter comes with the request; {VllmCpu.KV_CACHE_GIB} GiB of KV cache "
            "(`VLLM_CPU_KVCACHE_SPACE`); "
            "`LD_PRELOAD` tcmalloc and Intel OpenMP, as its CPU guide asks, where present."
        )
    return notes


def vocab_gap(checkpoint: Path) -> tuple[int, int] | None:
    """(the model's vocabulary, its tokenizer's) when the model can sample ids that its tokenizer
    has no text for (bench/random_checkpoint.py's GPT-2 presets), else None."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        model = int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        tok = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
        ids = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok.get("added_tokens", []))]
        if model > max(ids) + 1:
            return model, max(ids) + 1
    return None


def _vocab_note(checkpoint: Path) -> list[str]:
    gap = vocab_gap(checkpoint)
    if gap is None:
        return []
    model, tok = gap
    return [
        f"- The checkpoint's vocabulary ({model:,} ids) is larger than its tokenizer's "
        f"({tok:,}): sampling from random weights, about {1 - tok / model:.0%} of the tokens "
        "are ids without text, so the first chunk with text (TTFT) comes a few tokens in, and "
        "TPOT with it; tokens/s and latency count every token (`usage`)."
    ]


def _notes(summaries: list[dict], args, systems) -> list[str]:
    return [
        "Notes:",
        "",
        *_request_notes(systems, args),
        "- Output tokens are counted from each response's `usage.completion_tokens`; a response "
        "with a status other than 200, an error chunk or fewer tokens than asked counts as an "
        "error (its tokens still count toward tok/s)." + _short(summaries),
        "- Throughput is output tokens over the wall time of the row (first request sent to last "
        "answer); TTFT is the time to the first chunk with text; TPOT is "
        "(latency − TTFT) / (tokens − 1) per request. Latencies are end to end, seen by the client.",
        *(_vocab_note(args.checkpoint) if args.stream else []),
        "- CPU: the share of all cores' time, during the row, used by the server's processes (vLLM "
        "serves from three), by the load-generating client and by anything else on the machine "
        "(from /proc). The script waits for an idle machine before each server and row, and runs "
        f"a row again (up to {args.retries} times) when other processes took more than "
        f"{args.max_other_cpu:.0%}.",
    ]


def markdown(summaries, args, command, info, elapsed, plot_rel, systems) -> str:
    where = f"{os.cpu_count()}-core CPU" if args.device == "cpu" else args.device
    key = getattr(args, "section", "")
    start, end = markers(key)
    skipped = getattr(args, "skipped", {})
    out = [
        start,
        HEADING + (f", `{args.checkpoint}`" if key else ""),
        "",
        f"Machine: {info}.  ",
        _setup(summaries, args, elapsed),
        "",
        f"Command: `{command}`",
        "",
        *_table(summaries),
        "",
        f"Measured ratios ({where}, {args.max_new_tokens} new tokens):",
        "",
        *ratios(summaries),
        "",
    ]
    if plot_rel:
        out += [f"![serving throughput and p95 latency against concurrency]({plot_rel})", ""]
    out += [*_systems(systems, str(args.checkpoint), skipped), ""]
    out += [*_notes(summaries, args, systems), "", end]
    return "\n".join(out) + "\n"


def replace_section(path: Path, section: str, key: str = "") -> None:
    """Write `section` in `path` in place of the previous one named `key` (between its markers;
    for the default model's, else an unmarked `## Serving...` section up to the next `## `
    heading); a new one goes after the last serving section, or at the end. Every other
    section is left alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start, end = markers(key)
    patterns = [re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n*", re.S)]
    if not key:
        patterns.append(re.compile(r"^## Serving\b[^\n]*\n.*?(?=^## |\Z)", re.S | re.M))
    for pattern in patterns:
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1)
            break
    else:
        ends = list(re.finditer(r"<!-- serve_bench:end[^>]*-->\n*", text))
        if ends:
            at = ends[-1].end()
            text = text[:at].rstrip("\n") + "\n\n" + section + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# plot


def _style_axes(matplotlib, closed: list[dict], ax1, ax2) -> None:
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({s["load"] for s in closed}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend(fontsize=8)


def plot(summaries: list[dict], path: Path, title: str) -> bool:
    """Throughput and p95 latency against concurrency (closed-loop rows); False when there are
    none."""
    closed = [s for s in summaries if s["mode"] == "closed"]
    if not closed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for name in dict.fromkeys(s["system"] for s in closed):
        pts = sorted((s["load"], s["tok_s"], s["lat_p95"]) for s in closed if s["system"] == name)
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=name)
    _style_axes(matplotlib, closed, ax1, ax2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
