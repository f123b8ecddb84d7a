"""`slmops serve`: run one model behind the local OpenAI-compatible API on 127.0.0.1.

``--threads auto`` (the default) measures candidate configurations (threads, OpenMP wait policy, batch size) in
child processes first (:mod:`slmops.runtime.tuning`), prints them and the choice, then sets the chosen wait
policy in this process's environment before it imports llama.cpp and loads the model with the chosen threads and
batch size. Measurements are not persisted here (``--tune-budget-s`` bounds them; 0 skips measuring and uses
llama.cpp's default threads). An integer forces the thread count.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from slmops.cli._common import console, err_console
from slmops.errors import ConfigError, InvalidModelError

if TYPE_CHECKING:
    from slmops.core.wire import RuntimeTuning
    from slmops.runtime.host import ModelInfo


def _registered(ref: str, context: int) -> tuple[Path, ModelInfo]:
    from slmops.registry import Registry
    from slmops.runtime.host import ModelInfo

    registry = Registry.open()
    try:
        report = registry.require_verified(ref)
        envelope = registry.resolve(report.digest)
        manifest = envelope.manifest
        ggufs = [entry for entry in manifest.files if entry.path.endswith(".gguf")]
        if manifest.format != "gguf" or len(ggufs) != 1:
            raise InvalidModelError(
                f"{manifest.name}@{manifest.version} is a {manifest.format} model with {len(ggufs)} .gguf files; "
                "`slmops serve` runs a single GGUF file: serve a GGUF variant of it"
            )
        trained = manifest.facts.context_length
        info = ModelInfo.from_manifest(
            manifest, digest=envelope.digest, context_tokens=min(context, trained) if trained else context
        )
        # requests may name the model as it was served (NAME@stable), besides NAME@vN and NAME
        return registry.blob_path(ggufs[0].digest), replace(info, aliases=(ref,))
    finally:
        registry.close()


def _forced_threads(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"--threads must be 'auto' or a positive integer; got {value!r}")
    return threads


def _measure(path: Path, digest: str, budget_s: float) -> RuntimeTuning:
    """Measure the candidates in child processes, print them and the choice, set the chosen wait policy."""
    from rich.table import Table

    from slmops.runtime.tuning import TuningConfig, apply_wait_policy, tune

    err_console.print(f"measuring serving configurations for up to {budget_s:g} s (--threads auto) ...")
    outcome = tune(path, digest, config=TuningConfig(budget_s=budget_s))
    chosen = outcome.tuning
    table = Table("threads", "wait policy", "batch", "prefill tok/s", "decode tok/s", "")
    for m in outcome.measurements:
        c = m.candidate
        mark = (
            "chosen"
            if (c.threads, c.omp_wait_policy, c.batch_tokens)
            == (
                chosen.threads,
                chosen.omp_wait_policy,
                chosen.batch_tokens,
            )
            else ""
        )
        table.add_row(
            str(c.threads),
            c.omp_wait_policy or "-",
            str(c.batch_tokens),
            f"{m.prefill_tokens_per_s:.1f}",
            f"{m.decode_tokens_per_s:.1f}",
            mark,
        )
    for c in outcome.not_measured:
        table.add_row(str(c.threads), c.omp_wait_policy or "-", str(c.batch_tokens), "-", "-", "not measured (budget)")
    err_console.print(table)
    for failure in outcome.failures:
        err_console.print(f"[yellow]not measured:[/] {failure}", highlight=False)
    apply_wait_policy(chosen.omp_wait_policy)  # this process has not imported llama.cpp yet
    err_console.print(
        f"chose {chosen.threads} thread(s), OpenMP wait policy {chosen.omp_wait_policy or '- (one thread)'}, batch "
        f"{chosen.batch_tokens}: {chosen.decode_tokens_per_s:.1f} decode tok/s, "
        f"{chosen.prefill_tokens_per_s:.1f} prefill tok/s"
    )
    return chosen


def serve(
    model: str = typer.Argument(..., help="A registered model (NAME, NAME@v2, NAME@stable) or a path to a .gguf file."),
    port: int = typer.Option(8080, help="Port on 127.0.0.1; 0 picks a free one."),
    threads: str = typer.Option(
        "auto",
        help="CPU threads for llama.cpp: 'auto' measures candidates on this device first and serves the best; "
        "an integer forces it.",
    ),
    tune_budget_s: float = typer.Option(
        30.0, "--tune-budget-s", min=0.0, help="Seconds --threads auto may measure for (0: llama.cpp's default)."
    ),
    context: int = typer.Option(2048, min=16, help="Context window in tokens (capped at the model's own)."),
    max_tokens: int = typer.Option(2048, min=1, help="Largest max_tokens a request may ask for."),
) -> None:
    """Serve a model locally with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    A registered model is verified (signature and digests) before it is loaded. The API listens on 127.0.0.1
    only; prompts and answers are never logged. Stop with Ctrl-C.

    Example: slmops serve gemma3-270m --port 8080 --threads auto
    """
    from slmops.runtime.backend import BackendConfig, LlamaCppBackend
    from slmops.runtime.host import ModelHost, ModelInfo
    from slmops.runtime.server import create_app
    from slmops.runtime.serving import LocalServer

    path = Path(model)
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise InvalidModelError(f"no GGUF file at {path}; pass an existing .gguf file or a registered model name")
        from slmops.registry.formats.gguf import gguf_facts, read_gguf

        trained = gguf_facts(read_gguf(path)).context_length
        info = ModelInfo.from_gguf(path, context_tokens=min(context, trained) if trained else context)
    else:
        path, info = _registered(model, context)
    forced = _forced_threads(threads)
    batch = BackendConfig.batch_tokens
    if forced is None and tune_budget_s > 0:
        tuning = _measure(path, info.digest or info.model_id, tune_budget_s)
        forced, batch = tuning.threads, tuning.batch_tokens
    # no telemetry leaves `slmops serve`, so prompts are not scored for drift (scoring costs time per request)
    backend = LlamaCppBackend.load(
        path,
        info.model_id,
        BackendConfig(
            context_tokens=info.context_tokens, threads=forced, batch_tokens=batch, prompt_nll_sample_rate=0.0
        ),
    )
    host = ModelHost()
    host.activate(backend, info)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    server = LocalServer(create_app(host, max_tokens_limit=max_tokens), port=port)
    try:
        server.start()
        console.print(f"serving {info.model_id} on {server.url}/v1 (OpenAI-compatible); Ctrl-C to stop", soft_wrap=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        host.deactivate()
        err_console.print("stopped")
