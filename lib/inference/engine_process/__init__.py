"""The generation engine in a process of its own (`ML_SERVICE_ENGINE=process`).

`protocol.py`: the messages on the two pipes; `worker.py`: the engine process's main;
`client.py`: `EngineProcess`, the `Engine` the server holds, which starts, supervises and restarts
the worker.

The front process (HTTP, validation, tokenisation, the response stream) and the engine process
(the continuous-batching loop of `engine.py` over the model) share no interpreter and no GIL: a
busy HTTP side no longer slows the decode steps down, and the engine's math has its cores to
itself. They talk over two one-way pipes (`multiprocessing.Pipe`, pickled tuples): the front sends
requests, cancellations and control messages; the engine sends, once per decode step, one message
with every piece of text, result and metric event of that step, and how many rows it runs.

`EngineProcess` (the front side) has the surface of `GenerationEngine` (`submit`, `submit_many`,
`stream`, `has_room`, `start`/`stop`/`abort`), so the routes cannot tell them apart:

- Backpressure is decided in the front without a round trip: it knows what it has sent and not
  seen finish, and the engine's last reported batch size; more than `max_queue` waiting is
  QueueFull at once.
- A caller that goes away (or a closed stream) sends a cancellation; the row leaves the batch at
  the next step.
- The model loads and warms up in the engine process; the front holds only the tokenizer and the
  model's shape (`FrontendInference`, weights on torch's meta device: no memory).
- An engine process that dies (killed, out of memory, a crash in native code) is noticed at once
  (its pipe closes): every request it held ends with `EngineDied` (never a hang), `alive` is false
  while a new process loads the same model, and `restarts` counts the restarts. `/ready` and
  `/metrics` read both.
"""
