"""The generation engine in a process of its own (`ML_SERVICE_ENGINE=process`).

`protocol.py`: the messages on the two pipes; `worker.py`: the engine process's main;
`launch.py`: starting a worker, and the standby (a worker launched ahead, already imported, that
replaces a dead engine process); `client.py`: `EngineProcess`, the `Engine` the server holds,
which starts, supervises and restarts the worker.

The front process (HTTP, validation, tokenisation, the response stream) and the engine process
(the continuous-batching loop of `engine.py` over the model) share no interpreter and no GIL: a
busy HTTP side no longer slows the decode steps down, and the engine's math has its cores to
itself. They talk over two one-way pipes (`multiprocessing.Pipe`, pickled tuples): the front sends
requests, cancellations and control messages; the engine sends, once per decode step, one message
with every piece of text, result and metric event of that step, and how many rows it runs.

`EngineProcess` (the front side, `client.py`, whose docstring has the details: backpressure,
cancellation, restarts) is an `Engine` like the others (contract.py), so the routes cannot tell
it from the thread engine.
"""
