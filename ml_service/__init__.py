"""HTTP layer: settings, the FastAPI app factory, routes, schemas and the error mapping.

It talks to the ML core through `lib.inference`: the engine contract and its registry
(`Engine`, `ENGINES`), the public types, and `InferenceService` for a model's own surface.
"""

__version__ = "0.1.0"
