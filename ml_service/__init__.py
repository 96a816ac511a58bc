"""HTTP layer: settings, the FastAPI app factory, routes, schemas and the error mapping.

It talks to the ML core only through `lib.inference.InferenceService`.
"""

__version__ = "0.1.0"
