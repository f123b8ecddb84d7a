"""The active model of a device, swapped atomically while requests are in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Unpack

from slmops.core.manifest import Manifest, RuntimeHints
from slmops.errors import UnavailableError
from slmops.runtime.backend import Backend, Completion, Sampling, TextStream

__all__ = ["ModelHost", "ModelInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the model it serves, besides the backend itself.

    Requests may name the model by any of :attr:`names`: ``model_id``, ``model_id`` without its ``@version``, or
    one of ``aliases``.
    """

    model_id: str
    digest: str | None = None
    chat_template: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""
    context_tokens: int = 2048
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.model_id, self.model_id.partition("@")[0], *self.aliases]))

    @classmethod
    def from_hints(cls, hints: RuntimeHints, *, model_id: str, digest: str | None, context_tokens: int) -> ModelInfo:
        return cls(
            model_id=model_id,
            digest=digest,
            chat_template=hints.chat_template,
            stop_tokens=list(hints.stop_tokens),
            bos_token=hints.bos_token or "",
            eos_token=hints.eos_token or "",
            context_tokens=context_tokens,
        )

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, digest: str | None, context_tokens: int, model_id: str | None = None
    ) -> ModelInfo:
        """Runtime hints of a registered version; ``model_id`` defaults to ``name@version``."""
        return cls.from_hints(
            manifest.runtime,
            model_id=model_id or f"{manifest.name}@{manifest.version}",
            digest=digest,
            context_tokens=context_tokens,
        )

    @classmethod
    def from_gguf(cls, path: Path, *, context_tokens: int, model_id: str | None = None) -> ModelInfo:
        """Runtime hints read from a GGUF file's own header (template, special tokens); ``model_id`` defaults to
        the file's stem. Raises :class:`~slmops.errors.InvalidGGUFError` for a file that is not valid GGUF."""
        from slmops.registry.formats.gguf import gguf_runtime_hints, read_gguf

        hints = gguf_runtime_hints(read_gguf(path))
        return cls.from_hints(hints, model_id=model_id or path.stem, digest=None, context_tokens=context_tokens)


class _Serialized:
    """A backend behind its model's lock: one call (or one open stream) at a time."""

    def __init__(self, backend: Backend, lock: threading.Lock) -> None:
        self._backend = backend
        self._lock = lock
        self.model_id = backend.model_id

    def complete(self, prompt: str, **sampling: Unpack[Sampling]) -> Completion:
        with self._lock:
            return self._backend.complete(prompt, **sampling)

    def stream(self, prompt: str, **sampling: Unpack[Sampling]) -> TextStream:
        """The lock is held until the stream is exhausted or closed: always do one or the other."""
        self._lock.acquire()
        try:
            pieces = self._backend.stream(prompt, **sampling)
        except BaseException:
            self._lock.release()
            raise
        pieces.call_on_close(self._lock.release)
        return pieces

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return self._backend.count_tokens(text)

    def close(self) -> None:
        """Does nothing: the :class:`ModelHost` closes the backend once its last lease is released."""


class _Loaded:
    def __init__(self, backend: Backend, info: ModelInfo, lock: threading.Lock | None = None) -> None:
        self.backend = backend
        self.info = info
        self.lock = lock or threading.Lock()
        self.serialized = _Serialized(backend, self.lock)
        self.leases = 0
        self.retired = False
        self.closed = False


class ModelHost:
    """Holds the active model. Requests take a lease; ``activate(new_backend, info)`` swaps atomically; the old
    backend is closed only after every lease on it is released, so requests in flight during a switch finish on
    the old model.

    llama.cpp contexts are not thread-safe, so calls are serialized per backend (a lock per loaded model): the
    backend a lease yields takes that lock for each call, and for a ``stream(...)`` until the stream is exhausted
    or closed. Two models (old and new, during a switch) generate in parallel.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._current: _Loaded | None = None

    def activate(self, backend: Backend, info: ModelInfo) -> None:
        """Serve ``backend`` from now on; the previous one is closed once its last lease is released.

        Activating the backend that is already active with new ``info`` keeps it loaded (and its lock)."""
        with self._mutex:
            old = self._current
            if old is not None and old.backend is backend:
                self._current = _Loaded(backend, info, old.lock)
                old.closed = True  # shared with the new entry: never closed on its behalf
            else:
                self._current = _Loaded(backend, info)
        self._retire(old)

    def deactivate(self) -> None:
        """Stop serving: new requests get :class:`UnavailableError`; requests in flight finish."""
        with self._mutex:
            old, self._current = self._current, None
        self._retire(old)

    def _retire(self, loaded: _Loaded | None) -> None:
        if loaded is None:
            return
        with self._mutex:
            loaded.retired = True
            close_now = loaded.leases == 0 and not loaded.closed
            if close_now:
                loaded.closed = True
        if close_now:
            self._close(loaded)

    def _close(self, loaded: _Loaded) -> None:
        try:
            with loaded.lock:
                loaded.backend.close()
        except Exception as exc:
            log.warning("closing model %s failed: %s", loaded.info.model_id, type(exc).__name__)

    @contextmanager
    def lease(self) -> Iterator[tuple[Backend, ModelInfo]]:
        """The active model, kept loaded until the ``with`` block ends; :class:`UnavailableError` if there is none."""
        with self._mutex:
            loaded = self._current
            if loaded is None:
                raise UnavailableError("no model is active on this device yet; retry once a model has been activated")
            loaded.leases += 1
        try:
            yield loaded.serialized, loaded.info
        finally:
            with self._mutex:
                loaded.leases -= 1
                close_now = loaded.retired and loaded.leases == 0 and not loaded.closed
                if close_now:
                    loaded.closed = True
            if close_now:
                self._close(loaded)

    @property
    def active(self) -> ModelInfo | None:
        with self._mutex:
            return self._current.info if self._current is not None else None
