"""Serving throughput and latency: our service against `transformers serve`, in the manner of
`vllm bench serve`.

Each system is started as a subprocess on a free local port (one at a time, each with the whole
machine), warmed up, then loaded by one asyncio + httpx client process:

- closed loop: N concurrent clients (`--concurrency 1 4 16 64`), each sending its next request as
  soon as the previous one is answered, `--requests-per-client` requests per client (at least
  `--min-requests` in all);
- open loop (`--rate R ...`): `--num-requests` requests with Poisson arrivals at R requests/s,
  however many are in flight.

Every request continues one of a fixed set of Russian prompts from the validation split of the
bundled corpus and asks for exactly `--max-new-tokens` tokens. Every response is checked (status
200, the completion token count); a failed or short response counts as an error. Reported: output
tokens/s, requests/s, end-to-end latency p50/p95/p99 and, with `--stream`, time to first token and
time per output token (after the first).

The machine is shared: before each server and each row the script waits (up to `--wait-quiet`
seconds) for other processes to leave the CPU idle, measures from /proc how the CPU was split
during the row (server / client / anything else), and runs a row again when anything else took
more than `--max-other-cpu` of it.

Systems: `ours` (serve.py, continuous batching up to 64 rows), `ours-nobatch` (the same with
ML_SERVICE_MAX_BATCH_SIZE=1), `tf-serve` (`transformers serve CHECKPOINT`, one `generate()` at a
time) and `tf-serve-cb` (the same with `--continuous-batching`). The peer needs
`pip install "transformers[serving]"` (the `bench` extra).

    python bench/serve_bench.py --stream --write BENCHMARKS.md --plot bench/serve_bench.png
    python bench/serve_bench.py --systems ours tf-serve-cb --concurrency 4 --requests-per-client 2
    python bench/serve_bench.py --rate 2 8 --num-requests 64 --stream

On a GPU, with a randomly initialised GPT-2 small (bench/random_checkpoint.py writes it):

    python bench/random_checkpoint.py --preset gpt2-124m
    python bench/serve_bench.py --checkpoint runs/bench/random-gpt2-124m --device cuda \
        --dtype bfloat16 --stream
"""

# The package, run by bench/serve_bench.py: systems.py (the systems and their server processes),
# load.py (prompts, CPU metering, the load generators, one system's rows), report.py (ratios,
# markdown, plot, BENCHMARKS.md's Serving section) and cli.py (the flags and the whole run).
