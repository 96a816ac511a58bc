"""The contract every model service implements, and how services are found by name.

A service declares its name, version and description; its request/response schemas (pydantic);
`load()` (once, at start-up); `preprocess(request)` (bad input -> `InvalidInput`, HTTP 400);
`predict(batch)` (a list of preprocessed inputs -> a list of outputs; any exception -> HTTP 403);
`postprocess(output, request)`; and `metadata()` for /metadata. The API routes are generic over it.
`create_engine()` says what runs `predict` for queued requests: a micro-batcher by default; a
service may bring its own engine (text generation: continuous batching and streaming).

Services register under the entry-point group ``ml_service.services`` in their pyproject.toml:

    [project.entry-points."ml_service.services"]
    my-service = "my_package.module:MyService"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

ENTRY_POINT_GROUP = "ml_service.services"
DEFAULT_SERVICE = "text-generation"


class InvalidInput(ValueError):
    """Raised by `preprocess` for input the service cannot take: becomes HTTP 400 with this message."""

    def __init__(self, msg: str, loc: str = "text"):
        super().__init__(msg)
        self.loc = loc


class BatchRequest(BaseModel):
    """The default /forward_batch body: a list of single requests."""

    model_config = ConfigDict(extra="forbid")
    items: list[dict] = Field(..., min_length=1, description="single /forward requests, in order")


class BatchResponse(BaseModel):
    model: str
    results: list[dict]


class ModelService(ABC):
    """One model behind the HTTP API. Subclasses set the class attributes and the four steps."""

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    request_model: ClassVar[type[BaseModel]]
    response_model: ClassVar[type[BaseModel]]
    batch_request_model: ClassVar[type[BaseModel]] = BatchRequest
    batch_response_model: ClassVar[type[BaseModel]] = BatchResponse

    def __init__(self, settings: Any = None):
        self.settings = settings

    @property
    def model_id(self) -> str:
        return self.name

    def load(self) -> None:
        """Load weights; called once before the first request (default: nothing)."""
        return None

    def warmup(self) -> None:
        """Run the model once after `load()` so the first request is not slow (default: nothing).
        /ready answers 200 only after it."""
        return None

    @abstractmethod
    def preprocess(self, request: BaseModel) -> Any:
        """Validate and convert one request (raise InvalidInput for bad input)."""

    @abstractmethod
    def predict(self, batch: list[Any]) -> list[Any]:
        """Outputs for a batch of preprocessed inputs, one per input, in order."""

    @abstractmethod
    def postprocess(self, output: Any, request: BaseModel) -> BaseModel:
        """The response for one request."""

    def create_engine(self, observer=None):
        """What runs the model for queued requests (after `load()`): by default a micro-batcher
        that calls `predict` with up to `max_batch_size` inputs at a time. `observer` (a
        `lib.inference.EngineObserver`) receives the engine's events for metrics."""
        from ml_service.batching import MicroBatcher

        s = self.settings
        return MicroBatcher(
            self.predict,
            max_batch_size=getattr(s, "max_batch_size", 32),
            max_wait_s=getattr(s, "batch_wait_ms", 2.0) / 1000,
            max_queue=getattr(s, "max_queue", 256),
            observer=observer,
        )

    def split_batch(self, batch_request: BaseModel) -> list[BaseModel]:
        """The single requests inside a /forward_batch body."""
        return [self.request_model.model_validate(item) for item in batch_request.items]

    def batch_response(self, responses: list[BaseModel]) -> BaseModel:
        return self.batch_response_model(
            model=self.model_id, results=[r.model_dump() for r in responses]
        )

    def metadata(self) -> dict:
        return {"service": self.name, "service_description": self.description}


class UnknownService(LookupError):
    pass


def discover_services() -> dict[str, Any]:
    """Installed services by name (entry points, not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_service_class(name: str) -> type[ModelService]:
    found = discover_services()
    if name not in found:
        known = ", ".join(sorted(found)) or "(none installed)"
        raise UnknownService(f"unknown service {name!r}; installed services: {known}")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, ModelService)):
        raise TypeError(f"entry point {name!r} is {cls!r}, not a ModelService subclass")
    return cls
