"""Which model is being served, and swapping it for another version without dropping requests.

A `Loaded` model is a service with its engine, built and warmed up together. `ModelHost` holds the
current one. A reload builds the next one off the event loop while the current one keeps serving,
then swaps them in one step on the event loop; the old engine finishes its in-flight requests
before it stops. A version that fails to load leaves the current one in place and says why.

Versions: with `models_dir`, every subdirectory holding a checkpoint (`config.json`) is a version,
and the default is the last one by name (`v1`, `v2`, ... or dates sort as expected). Several
versions may be loaded at once: a traffic split (`ML_SERVICE_TRAFFIC`, `POST /admin/traffic`)
sends each client to one of them (ml_service/traffic.py), a request may pin one, and a shadow
version may receive a copy of the traffic. Each loaded version holds its own weights.

LoRA adapters: each engine loads those of `ML_SERVICE_ADAPTERS_DIR` (read again by every build),
and those added at run time (`add_adapter`, POST /admin/adapters) are loaded by every engine built
afterwards too (a reload, another version), so a reload keeps them; `remove_adapter` forgets one.
Each version's service keeps the names its engine serves (`service.adapters`, read after each
change): requests are checked against it before they are queued.

What these errors say reaches clients (/ready, the admin answers): names and versions only, never
a server path or an exception's text; the log has the details.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.inference import Engine
from lib.inference.adapters import AdapterError, AdapterNotFound
from ml_service.contract import ModelService
from ml_service.observability import ServiceMetrics
from ml_service.settings import Settings
from ml_service.traffic import BadSplit, TrafficSplit

log = logging.getLogger("ml_service")


class VersionError(Exception):
    """A version that cannot serve what was asked of it. `loc` names where the request named it
    (`version`, `split`, the `X-Model-Version` header, the OpenAI `model`): backend/errors.py
    maps each class to its status and puts `loc` in the answer."""

    def __init__(self, message: str, loc: str = "version"):
        super().__init__(message)
        self.loc = loc


class VersionNotFound(VersionError, LookupError):
    """No such version (or no versions at all)."""


class VersionNotLoaded(VersionNotFound):
    """A request pinned a version that this replica does not hold."""


class ReloadFailed(VersionError, RuntimeError):
    """The version exists but failed to load (the log has why); what served keeps serving."""


LOAD_FAILED = "the model failed to load; the server log has the details"


@dataclass(frozen=True)
class Loaded:
    service: ModelService
    engine: Engine
    version: str | None
    created: float = field(default_factory=time.time)  # when it was loaded (unix time)


def read_adapters(loaded: Loaded) -> list[dict]:
    """Ask `loaded`'s engine for its adapters (blocking) and keep the names it serves on its
    service (`service.adapters`: name -> description; one being removed is no longer served);
    what the engine listed."""
    if not loaded.engine.capabilities.adapters:
        return []
    listed = loaded.engine.list_adapters()
    loaded.service.adapters = {a["name"]: a for a in listed if not a["removing"]}
    return listed


def list_versions(models_dir: Path) -> list[str]:
    if not models_dir.is_dir():
        log.error("the models directory %s does not exist", models_dir)
        raise VersionNotFound("the models directory does not exist")
    return sorted(d.name for d in models_dir.iterdir() if (d / "config.json").is_file())


def resolve_version(settings: Settings, version: str | None) -> tuple[Path, str | None]:
    """The checkpoint directory and version name to load (`version` None: the configured one)."""
    if settings.models_dir is None:
        if version is not None:
            raise VersionNotFound("versions need ML_SERVICE_MODELS_DIR (a directory of versions)")
        return settings.checkpoint, settings.checkpoint.name
    versions = list_versions(settings.models_dir)
    if not versions:
        log.error("no checkpoints in the models directory %s", settings.models_dir)
        raise VersionNotFound("no checkpoints in the models directory")
    name = version or settings.model_version or versions[-1]
    if name not in versions:
        raise VersionNotFound(f"unknown version {name!r}; available: {', '.join(versions)}")
    return settings.models_dir / name, name


class ModelHost:
    def __init__(
        self, settings: Settings, service: ModelService, metrics: ServiceMetrics | None = None
    ):
        self.settings = settings
        self.metrics = metrics
        self._first_service = service  # built by the app factory (or given by a test)
        self.current: Loaded | None = None  # the default version (no split, or no pin)
        self.loaded: dict[str, Loaded] = {}  # every version held in memory, by name
        self.split: TrafficSplit | None = None
        self.shadow: Loaded | None = None  # receives a copy of the traffic (answers discarded)
        self.error: str | None = None  # why the first load failed
        self.started = False  # the first load, the split and the shadow are all in place
        self._reloading = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._retiring_engines: set[Engine] = set()  # old versions finishing their requests
        self._shadowing: set[asyncio.Task] = set()  # copies of requests on the shadow version
        # adapters added at run time, name -> directory: every engine built later loads them too
        self.added_adapters: dict[str, str] = {}
        if metrics is not None:
            metrics.track_engine(
                lambda: sum(v.engine.running for v in self._engines_of()),
                lambda: sum(v.engine.waiting for v in self._engines_of()),
                lambda: float(self.engines_alive()),
            )

    def engines_alive(self) -> bool:
        """Whether every loaded version's engine takes requests (an engine in its own process
        is not while that process restarts after a crash)."""
        return bool(self.current) and all(v.engine.alive for v in self._engines_of())

    def _engines_of(self) -> list[Loaded]:
        """Every loaded version (the default, the split's, the shadow), once each."""
        seen = {id(v): v for v in [*self.loaded.values(), self.current, self.shadow] if v}
        return list(seen.values())

    def _build(self, version: str | None, service: ModelService | None = None) -> Loaded:
        """Load, start and warm up a service (blocking: run it in a thread)."""
        path, name = resolve_version(self.settings, version)
        if service is None:
            settings = self.settings.model_copy(update={"checkpoint": path})
            service = type(self._first_service)(settings)
        elif self.settings.models_dir is not None:
            service.settings = service.settings.model_copy(update={"checkpoint": path})
        service.load()
        service.warmup()
        observer = self.metrics.for_version(name) if self.metrics is not None else None
        engine = service.create_engine(observer=observer)
        engine.start()
        loaded = Loaded(service, engine, name)
        if engine.capabilities.adapters:
            for adapter, path in dict(self.added_adapters).items():
                try:
                    engine.add_adapter(adapter, path)
                except AdapterError as e:
                    log.warning("adapter %r not loaded by version %s: %s", adapter, name, e)
            read_adapters(loaded)
        return loaded

    async def start(self) -> None:
        """The first load (in a thread, so the event loop keeps answering /health)."""
        try:
            loaded = await asyncio.to_thread(self._build, None, self._first_service)
        except Exception:
            self.error = LOAD_FAILED  # for clients; the log has the exception and the path
            log.exception("the model failed to load")
            return
        self._install(loaded)
        log.info(
            "serving %s (%s), version %s",
            loaded.service.name,
            loaded.service.model_id,
            loaded.version,
        )
        if self.settings.traffic:
            try:
                await self.set_traffic(TrafficSplit.parse(self.settings.traffic))
            except (BadSplit, VersionError) as e:
                log.error(
                    "ML_SERVICE_TRAFFIC not applied (%s): serving %s alone", e, loaded.version
                )
        if self.settings.shadow_version:
            try:
                self.shadow = await self._version(self.settings.shadow_version)
                log.info("shadow version %s receives a copy of the traffic", self.shadow.version)
            except VersionError as e:
                log.error("ML_SERVICE_SHADOW_VERSION not loaded: %s", e)
        self.started = True

    async def _load(self, version: str | None, then: str = "") -> Loaded:
        """Load `version` (None: the configured one) in a thread: VersionNotFound before any
        loading, ReloadFailed if it fails to load (`then`: what happens instead, for the
        message)."""
        _, name = resolve_version(self.settings, version)
        then = f"; {then}" if then else ""
        try:
            return await asyncio.to_thread(self._build, version)
        except Exception as e:
            log.exception("version %s failed to load%s", name, then)
            details = "(the server log has the details)"
            raise ReloadFailed(f"version {name!r} failed to load {details}{then}") from e

    async def _version(self, name: str) -> Loaded:
        """A loaded version by name, loading it (in a thread) when it is not held yet."""
        if name not in self.loaded:
            self.loaded[name] = await self._load(name)
        return self.loaded[name]

    async def set_traffic(self, split: TrafficSplit) -> None:
        """Load the split's versions that are not held yet, then route by the split. A version
        that is unknown or fails to load raises, and the split in force stays. Versions that
        leave the split (and are neither the default nor the shadow) are unloaded after their
        in-flight requests."""
        async with self._reloading:
            try:
                for name in split.versions:
                    await self._version(name)
            except VersionError as e:
                raise type(e)(f"{e}; the split in force stays", loc="split") from e
            self.split = split
            if self.metrics is not None:
                self.metrics.set_split(split.shares())
            self._prune()
            log.info("traffic split now %s", split.text())

    async def clear_traffic(self) -> None:
        """Every request to the default version again (the others are unloaded)."""
        async with self._reloading:
            self.split = None
            if self.metrics is not None:
                self.metrics.set_split({})
            self._prune()
            log.info("traffic split cleared: the default version serves everything")

    def choose(
        self, client: str, pinned: str | None = None, pinned_by: str = "x-model-version"
    ) -> Loaded:
        """The version for one request: the pinned one (VersionNotLoaded, at `pinned_by`, unless
        it is loaded), else the split's choice for this client, else the default."""
        if pinned is not None:
            if pinned in self.loaded:
                chosen = self.loaded[pinned]
            else:
                held = ", ".join(sorted(self.loaded))
                raise VersionNotLoaded(
                    f"version {pinned!r} is not loaded here (loaded: {held})", loc=pinned_by
                )
        elif self.split is not None:
            chosen = self.loaded[self.split.assign(client)]
        else:
            chosen = self.current
        return chosen

    async def reload(self, version: str | None) -> tuple[Loaded, Loaded | None]:
        """Load `version` and swap it in; returns (new, old). The old one serves until the swap."""
        async with self._reloading:
            then = (  # after a failed first load there is none to keep serving
                "the current model keeps serving"
                if self.current is not None
                else "no model is loaded: requests get 503 until a reload succeeds"
            )
            loaded = await self._load(version, then=then)
            old = self.current
            replaced = self.loaded.get(loaded.version)  # the same version, read again
            self._install(loaded)
            if replaced is not None and all(replaced is not v for v in self._engines_of()):
                self._retire(replaced)
            self._prune()
            log.info("now serving version %s (%s)", loaded.version, loaded.service.model_id)
            return loaded, old

    # -- LoRA adapters (POST/DELETE /admin/adapters); one change at a time, never during a reload
    async def add_adapter(self, name: str, path: str) -> dict:
        """Load adapter `path` as `name` on the default version (AdapterError: why it cannot),
        then on the other loaded versions (those that cannot are logged); engines built later
        load it too. Its description."""
        async with self._reloading:
            current = self._serving()
            described = await asyncio.to_thread(current.engine.add_adapter, name, path)
            for other in self._engines_of():
                if other is not current and other.engine.capabilities.adapters:
                    try:
                        await asyncio.to_thread(other.engine.add_adapter, name, path)
                    except AdapterError as e:
                        log.warning(
                            "adapter %r not loaded by version %s: %s", name, other.version, e
                        )
            self.added_adapters[name] = path
            await self._read_all_adapters()
            log.info("adapter %r added (%s)", name, path)
            return described

    async def remove_adapter(self, name: str) -> int:
        """Stop serving adapter `name` (AdapterNotFound when no version serves it): new requests
        for it are refused now, and each engine unloads it once its running requests end (their
        count is returned). Engines built later do not load it (unless its directory holds it)."""
        async with self._reloading:
            self.added_adapters.pop(name, None)
            held = [v for v in self._engines_of() if name in getattr(v.service, "adapters", {})]
            if not held:
                raise AdapterNotFound(name)
            for loaded in held:
                try:
                    await asyncio.to_thread(loaded.engine.remove_adapter, name)
                except AdapterNotFound:
                    pass  # (unloaded meanwhile: evicted to make room)
            listed = await self._read_all_adapters()
            log.info("adapter %r removed", name)
            return sum(a["running"] for a in listed if a["name"] == name)

    async def list_adapters(self) -> list[dict]:
        """The default version's adapters, as its engine describes them now."""
        current = self._serving()
        return await asyncio.to_thread(current.engine.list_adapters)

    def _serving(self) -> Loaded:
        if self.current is None:
            raise VersionNotFound("no model is loaded (the server log says why)", loc="model")
        return self.current

    async def _read_all_adapters(self) -> list[dict]:
        """Every loaded version's adapters read again (an addition may have unloaded the least
        recently used one); what their engines list, all together."""
        listed = []
        for loaded in self._engines_of():
            listed += await asyncio.to_thread(read_adapters, loaded)
        return listed

    def mirror(self, requests: list, chosen: Loaded, prepare) -> None:
        """A copy of validated requests for the shadow version, if there is one (and it is not
        the version that serves them): preprocessed by its own service through `prepare` (an
        async `prepare(fn, *args)` that runs fn off the event loop, as the client's own request
        was), queued only when its engine has room, its answers and errors discarded (its
        metrics, labelled by version, are what it is for). Never awaited, so the client's answer
        never waits for it."""
        shadow = self.shadow
        if shadow is None or shadow is chosen:
            return
        task = asyncio.ensure_future(self._shadow(shadow, requests, prepare))
        self._shadowing.add(task)
        task.add_done_callback(self._shadow_done)

    @staticmethod
    async def _shadow(shadow: Loaded, requests: list, prepare) -> None:
        try:
            items = await prepare(lambda: [shadow.service.preprocess(r) for r in requests])
        except Exception:  # e.g. a prompt too long for the shadow's context: no copy
            return
        if shadow.engine.has_room(len(items)):
            await shadow.engine.submit_many(items)

    def _shadow_done(self, task: asyncio.Task) -> None:
        self._shadowing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("shadow request failed: %r", task.exception())

    def _prune(self) -> None:
        """Unload (after their in-flight requests) the versions nobody routes to any more: not
        the default, not in the split, not the shadow."""
        keep = {v.version for v in (self.current, self.shadow) if v}
        keep |= set(self.split.versions if self.split else ())
        for name in [n for n in self.loaded if n not in keep]:
            self._retire(self.loaded.pop(name))

    def _retire(self, old: Loaded) -> None:
        """Stop an engine once its in-flight requests are done, off the event loop."""
        task = asyncio.create_task(asyncio.to_thread(old.engine.stop, 300.0))
        self._retiring.add(task)
        self._retiring_engines.add(old.engine)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(lambda _: self._retiring_engines.discard(old.engine))

    def _install(self, loaded: Loaded) -> None:
        """`loaded` becomes the default version, and the one held under its name."""
        self.current = loaded
        self.loaded[loaded.version] = loaded
        if self.shadow is not None and self.shadow.version == loaded.version:
            self.shadow = loaded
        self.error = None
        if self.metrics is not None:
            self.metrics.set_model(loaded.service.metadata(), loaded.version)

    def abort(self, error: BaseException) -> None:
        """End every request still queued or running, on the current engine and on old versions'
        that are finishing theirs, with `error` (blocking: call it off the event loop)."""
        for engine in [*self._retiring_engines, *(v.engine for v in self._engines_of())]:
            engine.abort(error)

    async def stop(self, timeout: float) -> None:
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout)
        for loaded in self._engines_of():
            await asyncio.to_thread(loaded.engine.stop, timeout)
