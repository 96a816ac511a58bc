#!/usr/bin/env python
"""llama.cpp as a serving-benchmark peer: build its `llama-server` and convert our checkpoints.

    python bench/llama_cpp.py build                  # llama-server from llama-cpp-python's sdist
    python bench/llama_cpp.py convert models/default # f32 and q8_0 GGUF files, then `check`
    python bench/llama_cpp.py check models/default   # llama.cpp tokenizes and predicts as we do
    python bench/llama_cpp.py where models/default   # the GGUF paths the benchmark uses

`build` fetches the sdist of the PyPI package llama-cpp-python (pip: the one download), unpacks
it under .llama-cpp/ (ignored by git) and builds only the `llama-server` target of the llama.cpp
it vendors: CPU only, static, `-march=native` (llama.cpp's default), no web UI, no TLS.
`convert` runs llama.cpp's own `convert_hf_to_gguf.py` in a venv of its own, .venv-llama (torch,
transformers, tokenizers, safetensors and numpy at .venv's versions, llama.cpp's `gguf`), to
.llama-cpp/gguf/NAME-HASH/model-{f32,q8_0}.gguf, then runs `check`. Each step skips what is done.

The pre-tokenizer. The converter names a BPE's pre-tokenizer by hashing the ids it gives a test
string and looking the hash up among known models (`get_vocab_base_pre`); ours is in no list, so
it refuses. `pre_tokenizer()` decides from tokenizer.json instead: no normalizer and a
`ByteLevel` pre-tokenizer with GPT-2's regex (`use_regex: true`) and no added prefix space is
GPT-2's pre-tokenization, llama.cpp's "gpt-2"; anything else is refused with the reason. The
converter runs with `get_vocab_base_pre` wrapped (a known hash keeps its answer, an unknown one
gets ours; and its GPT-2 reads `n_ctx`, which transformers 5 no longer writes: `n_positions`).
`check` proves the mapping: llama-server on each GGUF tokenizes fixed Russian and English texts
(digits, contractions, runs of spaces, newlines, emoji) and the benchmark's prompts through
`/tokenize` (`add_special: true`, as its completions do), and any text whose ids differ from our
tokenizer's fails it (exit 1); so does an f32 file whose next-token probabilities differ from
the checkpoint's under transformers by more than F32_PROB_GAP. The benchmark serves only GGUF
files that passed, written from the checkpoint's present files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

# stdlib only at the top: `_convert` runs under .venv-llama's Python, which has none of ours

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # the PyPI release whose sdist vendors the llama.cpp we build
HOME = ROOT / ".llama-cpp"
SOURCE = HOME / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
BUILD = HOME / "build"
SERVER = BUILD / "bin" / "llama-server"
BUILD_STAMP = BUILD / ".built"
VENV = ROOT / ".venv-llama"
VENV_STAMP = VENV / ".installed"
GGUF_ROOT = HOME / "gguf"
OUTTYPES = ("f32", "q8_0")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server is one of the tools
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",  # served on 127.0.0.1 only
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI at configure time
)
# the versions the converter's venv takes from ours (transformers: the same major, so it reads
# our tokenizer_config.json's TokenizersBackend)
PINNED = ("torch", "transformers", "tokenizers", "safetensors", "numpy")
GPT2_PRE = "gpt-2"
F32_PROB_GAP = 1e-3  # the most an f32 GGUF's next-token probability may differ from ours  # llama.cpp's name for GPT-2's pre-tokenizer (LLAMA_VOCAB_PRE_TYPE_GPT2)

# texts whose tokenization must agree: Russian and English prose, and the cases where
# pre-tokenizers differ (contractions, digit runs, runs of spaces, newlines, tabs, emoji, symbols)
PARITY_TEXTS = (
    "Привет, мир! Как дела?",
    "В 1812 году Наполеон вошёл в Москву, а 3.5% жителей — остались.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "  Два пробела в начале и три   посередине\nи перевод строки\n\n\tи табуляция ",
    "The quick brown fox jumps over the lazy dog.",
    "I've been told he's there, 'RE you sure? We'll see: it's 12,345.67 dollars!!!",
    "trailing spaces   ",
    "mixed: Москва-2024 and naïve café 🚀 (emoji) ✅ 🦙🦙",
    "code: def f(x):\n    return x**2  # комментарий",
    "ёЁ «кавычки» … — – ₽ № §",
)


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", flush=True)


def shown(path: Path) -> str:
    """A path relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


# --------------------------------------------------------------------------------------------
# build


def fetch_source() -> None:
    """The sdist (pip download, no dependencies) unpacked under .llama-cpp/src."""
    if (SOURCE / "convert_hf_to_gguf.py").exists():
        return
    sdist_dir = HOME / "sdist"
    archive = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.exists():
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist_dir])
    (HOME / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(HOME / "src", filter="data")


def build(jobs: int = 2) -> Path:
    """llama-server, built once (a stamp records the release it came from)."""
    if SERVER.exists() and BUILD_STAMP.exists() and BUILD_STAMP.read_text() == LLAMA_CPP_PYTHON:
        log(f"built: {shown(SERVER)} ({server_version()})")
        return SERVER
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(
                f"{tool} not found: install cmake and a C++ compiler (apt-get install cmake g++)"
            )
    t0 = time.perf_counter()
    fetch_source()
    t1 = time.perf_counter()
    run(["cmake", "-S", SOURCE, "-B", BUILD, *CMAKE_OPTIONS])
    run(["cmake", "--build", BUILD, "--target", "llama-server", f"-j{jobs}"])
    BUILD_STAMP.write_text(LLAMA_CPP_PYTHON)
    t2 = time.perf_counter()
    log(f"source {t1 - t0:.0f} s, build {t2 - t1:.0f} s: {SERVER} ({server_version()})")
    return SERVER


def server_version(server: Path = SERVER) -> str:
    """llama-server's own version line, e.g. "version: 1 (0c1e570)"."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=30)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.strip()
    return "version unknown"


# --------------------------------------------------------------------------------------------
# the converter's venv


def pins() -> list[str]:
    """`name==version` of PINNED as installed in this (our) interpreter."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in PINNED]


def venv() -> Path:
    python = VENV / "bin" / "python"
    wanted = "\n".join(pins())
    if python.exists() and VENV_STAMP.exists() and VENV_STAMP.read_text() == wanted:
        return python
    fetch_source()
    t0 = time.perf_counter()
    if not python.exists():
        run([sys.executable, "-m", "venv", VENV])
    # gguf from the llama.cpp we build (its converter and its reader must agree); sentencepiece
    # because the converter's requirements name it (our BPE does not use it)
    run([python, "-m", "pip", "install", "--quiet", *pins(), "sentencepiece", SOURCE / "gguf-py"])
    VENV_STAMP.write_text(wanted)
    log(f"{shown(VENV)} ready in {time.perf_counter() - t0:.0f} s")
    return python


# --------------------------------------------------------------------------------------------
# conversion


def pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for the pre-tokenization of a tokenizer.json (parsed), or ValueError
    saying why it has none."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"not a BPE tokenizer (model type {model.get('type')!r})")
    if model.get("byte_fallback"):
        raise ValueError("a BPE with byte_fallback is SentencePiece-style, not GPT-2's byte level")
    if tokenizer.get("normalizer") is not None:
        raise ValueError(
            f"a normalizer ({tokenizer['normalizer'].get('type')}): llama.cpp's GPT-2 "
            "pre-tokenizer has none"
        )
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise ValueError(f"pre-tokenizer {pre.get('type')!r}, not GPT-2's ByteLevel")
    if not pre.get("use_regex", True):
        raise ValueError("ByteLevel without its regex: the split is not GPT-2's")
    if pre.get("add_prefix_space"):
        raise ValueError("ByteLevel with add_prefix_space: llama.cpp's GPT-2 adds no space")
    return GPT2_PRE


def fingerprint(checkpoint: Path) -> dict:
    """What a GGUF is written from: the checkpoint's files (size and modification time), the
    llama.cpp release and the pre-tokenizer name."""
    files = {}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        path = checkpoint / name
        if path.exists():
            st = path.stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    return {"llama_cpp_python": LLAMA_CPP_PYTHON, "files": files}


def gguf_dir(checkpoint: Path) -> Path:
    """The folder of a checkpoint's GGUF files: its name and a hash of its absolute path."""
    checkpoint = checkpoint.resolve()
    digest = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:8]
    return GGUF_ROOT / f"{checkpoint.name}-{digest}"


def gguf_path(checkpoint: Path, outtype: str) -> Path:
    return gguf_dir(checkpoint) / f"model-{outtype}.gguf"


def stamp_path(gguf: Path) -> Path:
    return gguf.with_suffix(".json")


def read_stamp(gguf: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(stamp_path(gguf).read_text())
    return {}


def ready_gguf(checkpoint: Path, outtype: str) -> tuple[Path, str | None]:
    """The GGUF the benchmark serves and why it cannot (None: it can): it must exist, come from
    the checkpoint's present files and have passed the tokenization check."""
    gguf = gguf_path(checkpoint, outtype)
    stamp = read_stamp(gguf)
    hint = f"python bench/llama_cpp.py convert {checkpoint}"
    if not gguf.exists() or not stamp:
        return gguf, f"no {outtype} GGUF for {checkpoint} ({hint})"
    if stamp.get("source") != fingerprint(checkpoint.resolve()):
        return gguf, f"the {outtype} GGUF is older than {checkpoint}'s files ({hint})"
    if stamp.get("tokenization") != "checked":
        return gguf, f"the {outtype} GGUF's tokenization is not checked ({hint})"
    return gguf, None


def convert(checkpoint: Path, outtypes=OUTTYPES, check_after: bool = True) -> list[Path]:
    checkpoint = checkpoint.resolve()
    pre = pre_tokenizer(json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8")))
    source = fingerprint(checkpoint)
    written = []
    for outtype in outtypes:
        gguf = gguf_path(checkpoint, outtype)
        stamp = read_stamp(gguf)
        if gguf.exists() and stamp.get("source") == source:
            log(f"converted: {shown(gguf)} ({stamp.get('seconds', '?')} s then)")
            written.append(gguf)
            continue
        python = venv()
        gguf.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        run([python, __file__, "_convert", checkpoint, gguf, outtype, pre])
        seconds = round(time.perf_counter() - t0, 1)
        stamp = {"source": source, "pre_tokenizer": pre, "outtype": outtype, "seconds": seconds}
        stamp_path(gguf).write_text(json.dumps(stamp, indent=1))
        size = gguf.stat().st_size / 2**20
        log(f"{outtype}: {shown(gguf)}, {size:.1f} MiB in {seconds} s")
        written.append(gguf)
    if check_after:
        check(checkpoint, outtypes)
    return written


def _convert(checkpoint: str, outfile: str, outtype: str, pre: str) -> None:
    """Runs in .venv-llama: convert_hf_to_gguf.py with its pre-tokenizer lookup wrapped."""
    import runpy

    sys.path[:0] = [str(SOURCE), str(SOURCE / "gguf-py")]
    import conversion.base as base  # llama.cpp's, from SOURCE

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            name = known(self, tokenizer)
        except NotImplementedError:  # the hash is in no list (its warning above is expected)
            log(f"pre-tokenizer not in llama.cpp's list: {pre!r}, from our tokenizer.json")
            return pre
        log(f"pre-tokenizer known to llama.cpp: {name!r} (ours would say {pre!r})")
        return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    # its GPT-2 reads the context length from `n_ctx`, which transformers 5's GPT2Config no
    # longer writes: it is `n_positions` (the same number in GPT-2's own configs)
    import conversion.gpt2 as gpt2

    parameters = gpt2.GPT2Model.set_gguf_parameters

    def set_gguf_parameters(self) -> None:
        self.hparams.setdefault("n_ctx", self.hparams["n_positions"])
        parameters(self)

    gpt2.GPT2Model.set_gguf_parameters = set_gguf_parameters
    script = SOURCE / "convert_hf_to_gguf.py"
    sys.argv = [str(script), checkpoint, "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(str(script), run_name="__main__")


# --------------------------------------------------------------------------------------------
# the tokenization check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 30) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_server(gguf: Path, ctx: int = 2048, timeout: float = 120):
    """llama-server on `gguf` (one slot, its log in a file beside the GGUF); yields its URL."""
    port = free_port()
    log_path = gguf.with_suffix(".server.log")
    cmd = [SERVER, "--model", gguf, "--host", "127.0.0.1", "--port", port, "--ctx-size", ctx]
    cmd += ["--parallel", 1, "--no-webui", "--threads", 1]
    with log_path.open("wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s ({log_path})")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parity_texts(prompts: int = 16) -> list[str]:
    """PARITY_TEXTS and the first `prompts` of the serving benchmark's prompts."""
    from bench.serving.load import validation_prompts

    return [*PARITY_TEXTS, *validation_prompts(prompts, 160, 0.05)]


def mismatches(ours, theirs, texts) -> list[str]:
    """A line for every text that two tokenizers (text -> ids) split differently."""
    lines = []
    for text in texts:
        a, b = list(ours(text)), list(theirs(text))
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            at = min(len(a), len(b)) if at is None else at
            lines.append(
                f"{text[:60]!r}: ours {a[at : at + 6]} vs llama.cpp {b[at : at + 6]} at {at}"
            )
    return lines


def next_token_gap(model, tokenizer, url: str, texts) -> float:
    """The largest difference between llama-server's probability of a next token (its top 5
    after each text) and the checkpoint's own under transformers (float32)."""
    import torch

    gap = 0.0
    for text in texts:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        body = {"prompt": text, "n_predict": 1, "temperature": 0, "n_probs": 5}
        body.update(cache_prompt=False, post_sampling_probs=False)
        top = post_json(url + "/completion", body)["completion_probabilities"][0]["top_logprobs"]
        for t in top:
            gap = max(gap, abs(math.exp(t["logprob"]) - float(probs[t["id"]])))
    return gap


def check(checkpoint: Path, outtypes=OUTTYPES) -> None:
    """Exits 1 unless llama-server tokenizes every parity text as our tokenizer does, for every
    GGUF of the checkpoint, and the f32 file's next-token probabilities are the checkpoint's
    (within F32_PROB_GAP; q8_0's gap is logged and kept in its stamp); marks each GGUF that
    passes as checked."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM

    from lib.tokenizer import load_tokenizer

    checkpoint = checkpoint.resolve()
    if not SERVER.exists():
        sys.exit(f"no {SERVER}: run `python bench/llama_cpp.py build` (or make llama-cpp)")
    tokenizer = load_tokenizer(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float32").eval()
    texts = parity_texts()
    for outtype in outtypes:
        gguf = gguf_path(checkpoint, outtype)
        if not gguf.exists():
            sys.exit(f"no {gguf}: run `python bench/llama_cpp.py convert {checkpoint}`")
        with running_server(gguf) as url:

            def llama(text: str, url=url) -> list[int]:
                body = {"content": text, "add_special": True, "parse_special": True}
                return post_json(url + "/tokenize", body)["tokens"]

            bad = mismatches(tokenizer.encode, llama, texts)
            gap = None if bad else next_token_gap(model, tokenizer, url, PARITY_TEXTS)
        stamp = read_stamp(gguf)
        if bad:
            stamp["tokenization"] = "differs"
            stamp_path(gguf).write_text(json.dumps(stamp, indent=1))
            print("\n".join(bad), file=sys.stderr)
            sys.exit(
                f"{gguf.name}: llama.cpp tokenizes {len(bad)} of {len(texts)} texts differently "
                f"from our tokenizer (pre-tokenizer {stamp.get('pre_tokenizer')!r}): the mapping "
                "is wrong, so the benchmark will not serve this file"
            )
        stamp["next_token_prob_gap"] = gap
        if outtype == "f32" and gap > F32_PROB_GAP:
            stamp["tokenization"] = "checked, but the f32 model's probabilities differ"
            stamp_path(gguf).write_text(json.dumps(stamp, indent=1))
            sys.exit(
                f"{gguf.name}: next-token probabilities differ from the checkpoint's by up to "
                f"{gap:.2g} (allowed {F32_PROB_GAP:g}): the conversion is wrong"
            )
        stamp["tokenization"] = "checked"
        stamp_path(gguf).write_text(json.dumps(stamp, indent=1))
        log(
            f"{gguf.name}: {len(texts)} texts, the same ids as our tokenizer; next-token "
            f"probabilities within {gap:.1e} of the checkpoint's"
        )


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "_convert":
        _convert(*sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="llama-server from llama-cpp-python's sdist")
    b.add_argument("-j", "--jobs", type=int, default=2)
    for name, what in (
        ("convert", "f32 and q8_0 GGUF files of CHECKPOINT, then check"),
        ("check", "llama-server's tokenization against ours"),
        ("where", "print the GGUF paths and whether the benchmark can serve them"),
    ):
        c = sub.add_parser(name, help=what)
        c.add_argument("checkpoint", type=Path)
        c.add_argument("--outtypes", nargs="+", choices=OUTTYPES, default=list(OUTTYPES))
    args = p.parse_args(argv)
    if args.command == "build":
        build(args.jobs)
    elif args.command == "convert":
        if not SERVER.exists():
            build()
        convert(args.checkpoint, args.outtypes)
    elif args.command == "check":
        check(args.checkpoint, args.outtypes)
    else:
        for outtype in args.outtypes:
            gguf, why = ready_gguf(args.checkpoint, outtype)
            print(f"{outtype}: {gguf}" + (f" (not usable: {why})" if why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
