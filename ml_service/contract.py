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
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lib.inference import ENGINES
from ml_service.settings import Settings
from ml_service.validation import pydantic_errors

ENTRY_POINT_GROUP = "ml_service.services"
DEFAULT_SERVICE = "text-generation"


class InvalidInput(ValueError):
    """Raised by `preprocess` for input the service cannot take: becomes HTTP 400 with this message
    at `loc` (a field name, or a path such as `("items", 3, "text")`)."""

    def __init__(self, msg: str, loc: str | Sequence[str | int] = "text"):
        super().__init__(msg)
        self.loc = [loc] if isinstance(loc, str) else list(loc)

    @property
    def errors(self) -> list[dict]:
        return [{"loc": [str(x) for x in self.loc], "msg": str(self)}]


class InvalidItems(InvalidInput):
    """Several errors at once (one /forward_batch item's validation)."""

    def __init__(self, errors: list[dict]):
        super().__init__(errors[0]["msg"], errors[0]["loc"])
        self._errors = errors

    @property
    def errors(self) -> list[dict]:
        return self._errors


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
    batch_field: ClassVar[str] = "items"  # the list in the /forward_batch body

    def __init__(self, settings: Settings | None = None):
        # without settings (a service built by hand): the defaults, without reading the environment
        self.settings = settings if settings is not None else Settings.model_construct()

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
        spec = self.settings.engine_spec()
        return ENGINES["micro-batch"].create(spec, model=self.predict, observer=observer)

    def batch_limit(self) -> int:
        """Most inputs in one /forward_batch: `max_texts`, and never more than the queue holds
        (a larger batch could never be queued)."""
        return min(self.settings.max_texts, self.settings.max_queue)

    def check_batch_size(self, n: int) -> None:
        if n > (limit := self.batch_limit()):
            raise InvalidInput(f"{n} inputs; the limit is {limit}", loc=self.batch_field)

    def batch_item_loc(self, i: int, loc: list) -> list:
        """Where an error of input `i` of a /forward_batch lies in its body."""
        return [self.batch_field, i, *loc]

    @classmethod
    def extra_routers(cls) -> list:
        """More routes the app serves for this service (FastAPI routers), beside /forward,
        /forward_batch and /metadata (default: none; text generation adds the OpenAI routes)."""
        return []

    # -- the response cache (ml_service/cache.py): a service whose outputs are determined by
    # their input says so here; by default nothing is cached
    def cache_key(self, item: Any) -> str | None:
        """A key that names this preprocessed input's output exactly (the model's content
        included), or None when the output is not fully determined by it (never cached)."""
        return None

    def cache_encode(self, output: Any) -> dict:
        """An output as JSON-ready data."""
        raise NotImplementedError

    def cache_decode(self, data: dict) -> Any:
        """`cache_encode`'s inverse."""
        raise NotImplementedError

    def cache_complete(self, output: Any) -> bool:
        """Whether an output may be stored (e.g. not one that was cut short)."""
        return True

    def split_batch(self, batch_request: BaseModel) -> list[BaseModel]:
        """The single requests inside a /forward_batch body."""
        items = getattr(batch_request, self.batch_field)
        self.check_batch_size(len(items))
        out = []
        for i, item in enumerate(items):
            try:
                out.append(self.request_model.model_validate(item))
            except ValidationError as e:  # the same wording and paths as a single request's
                errors = pydantic_errors(e)
                for err in errors:
                    err["loc"] = [str(x) for x in self.batch_item_loc(i, err["loc"])]
                raise InvalidItems(errors) from None
        return out

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
