"""The serving engine's batching defaults, in a module that imports nothing.

`GenerationEngine` (engine.py), its process (engine_process) and the service's
ML_SERVICE_MAX_BATCH_SIZE, BATCH_WAIT_MS and MAX_QUEUE settings start from these; the service's
settings import no torch, so the numbers live here and not in engine.py.
"""

ENGINE_MAX_BATCH_SIZE = 64  # most sequences decoded together (1 disables batching)
ENGINE_MAX_WAIT_S = 0.0  # how long the first request to an idle engine waits for company
ENGINE_MAX_QUEUE = 256  # most requests waiting for a batch row; more are refused at once
