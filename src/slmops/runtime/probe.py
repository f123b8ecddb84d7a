"""The health probe: does this model load, and does it generate sensible tokens within a latency budget?

``probe_backend`` checks an already loaded backend. ``probe_model_file`` loads the file in a child process
(``python -m slmops.runtime.probe``), so a model that crashes llama.cpp (an assertion that aborts, a segfault)
fails the probe instead of killing the caller. Neither raises for a bad model: they return ``ok=False`` and a
reason. The probe prompt is fixed and harmless; the generated text is checked and then dropped, never returned.

:func:`run_child` is that child mechanism on its own: a JSON request on stdin, one result line on stdout, a crash
or a hang turned into a reason, and the environment set when the child starts (:func:`child_env`), which is when
settings such as ``OMP_WAIT_POLICY`` count. The serving-configuration measurement (:mod:`slmops.runtime.tuning`)
uses it too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmops.errors import SLMOpsError
from slmops.runtime.backend import Backend, BackendConfig
from slmops.runtime.chat import render_chat
from slmops.runtime.host import ModelInfo

__all__ = [
    "DEFAULT_PROBE_PROMPT",
    "ChildOutcome",
    "ProbeConfig",
    "ProbeResult",
    "child_env",
    "degenerate_reason",
    "emit_result",
    "probe_backend",
    "probe_model_file",
    "run_child",
]

DEFAULT_PROBE_PROMPT = "Write one short sentence about the sea."
_RESULT_MARK = "SLMOPS_PROBE_RESULT "
_REPEATED_UNIT = re.compile(r"(.{1,16}?)\1{2,}.{0,16}", re.DOTALL)


@dataclass(frozen=True)
class ProbeConfig:
    prompt: str = DEFAULT_PROBE_PROMPT
    max_tokens: int = 16
    max_latency_s: float = 30.0  # the generation, prompt processing included
    temperature: float = 0.0
    load_timeout_s: float = 120.0  # probe_model_file only: loading the model in the child process


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str  # "ok", or why the model failed
    load_s: float  # 0.0 when the backend was already loaded
    generate_s: float
    tokens: int
    decode_tokens_per_s: float  # tokens after the first / time after the first piece


def degenerate_reason(text: str) -> str | None:
    """Why ``text`` is not a sensible generation, or None: empty, only whitespace or replacement characters,
    one character or one short unit repeated over and over."""
    if not text:
        return "the model generated no text"
    meaningful = text.replace("\ufffd", "").replace("\u2585", "")
    if not meaningful.strip():
        return "the model generated only whitespace or replacement characters"
    stripped = text.strip()
    if len(stripped) >= 3 and len(set(stripped)) == 1:
        return "the model repeated one character"
    if len(text) >= 6 and _REPEATED_UNIT.fullmatch(text):
        return "the model repeated one token over and over"
    return None


def _fail(reason: str, load_s: float = 0.0, generate_s: float = 0.0, tokens: int = 0) -> ProbeResult:
    return ProbeResult(False, reason, load_s, generate_s, tokens, 0.0)


def probe_backend(backend: Backend, info: ModelInfo, config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Generate ``config.max_tokens`` tokens from the fixed prompt, with the model's chat template, and judge them."""
    try:
        prompt = render_chat(
            info.chat_template,
            [{"role": "user", "content": config.prompt}],
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )
    except SLMOpsError as exc:
        return _fail(f"the chat template cannot render the probe prompt: {exc}")
    start = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    tokens = 0
    too_slow = False
    try:
        with backend.stream(
            prompt,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=1.0,
            stop=list(info.stop_tokens),
            seed=0,
        ) as pieces:
            for piece in pieces:
                now = time.monotonic()
                first = now if first is None else first
                parts.append(piece)
                if now - start > config.max_latency_s:
                    too_slow = True
                    break
            tokens = pieces.completion_tokens
    except Exception as exc:  # a bad model must not take the caller down
        return _fail(f"generation failed: {type(exc).__name__}: {exc}", generate_s=time.monotonic() - start)
    end = time.monotonic()
    generate_s = end - start
    if too_slow or generate_s > config.max_latency_s:
        return _fail(
            f"generation took more than the {config.max_latency_s:g} s budget", generate_s=generate_s, tokens=tokens
        )
    problem = degenerate_reason("".join(parts))
    if problem is not None:
        return _fail(problem, generate_s=generate_s, tokens=tokens)
    decode = (tokens - 1) / (end - first) if first is not None and tokens > 1 and end > first else 0.0
    return ProbeResult(True, "ok", 0.0, generate_s, tokens, decode)


def _probe_in_this_process(request: dict[str, Any]) -> ProbeResult:
    from slmops.runtime.backends import open_backend

    info = ModelInfo(**request["info"])
    start = time.monotonic()
    try:
        backend = open_backend(
            Path(request["path"]),
            request.get("format", "gguf"),
            BackendConfig(**request["config"]),
            model_id=info.model_id,
        )
    except SLMOpsError as exc:
        return _fail(f"the model does not load: {exc}", load_s=time.monotonic() - start)
    load_s = time.monotonic() - start
    try:
        result = probe_backend(backend, info, ProbeConfig(**request["probe"]))
    finally:
        backend.close()
    return ProbeResult(result.ok, result.reason, load_s, result.generate_s, result.tokens, result.decode_tokens_per_s)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-limit:] if lines else ""


@dataclass(frozen=True)
class ChildOutcome:
    """What a child process (:func:`run_child`) gave back: its result object, or why there is none."""

    result: dict[str, Any] | None
    failure: str  # "" when there is a result
    elapsed_s: float


def child_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a runtime child process: this one's, with ``slmops`` importable, ggml's gdb backtrace off,
    and ``overrides`` (e.g. ``OMP_WAIT_POLICY``, which only counts when the child's OpenMP runtime loads)."""
    import slmops

    env = dict(os.environ)
    env["GGML_NO_BACKTRACE"] = "1"  # ggml would otherwise attach gdb to print a backtrace when it aborts
    package_root = str(Path(slmops.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env.update(overrides or {})
    return env


def run_child(module: str, request: dict[str, Any], timeout_s: float, env: dict[str, str]) -> ChildOutcome:
    """Run ``python -m module`` with ``request`` as JSON on stdin and read the result line it prints
    (``SLMOPS_PROBE_RESULT {json}``, see :func:`emit_result`). A crash, a hang (killed after ``timeout_s``) or an
    exit without a result is a failure with a reason, never an exception."""
    start = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        try:
            out, err = child.communicate(json.dumps(request, default=str), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return ChildOutcome(
                None,
                f"the child process did not finish within {timeout_s:g} s and was killed",
                time.monotonic() - start,
            )
    elapsed = time.monotonic() - start
    if child.returncode < 0:
        detail = _tail(err)
        return ChildOutcome(
            None,
            f"the model crashed the runtime (child process killed by {_signal_name(-child.returncode)})"
            + (f": {detail}" if detail else ""),
            elapsed,
        )
    for line in reversed(out.splitlines()):
        if line.startswith(_RESULT_MARK):
            return ChildOutcome(json.loads(line[len(_RESULT_MARK) :]), "", elapsed)
    detail = _tail(err)
    return ChildOutcome(
        None,
        f"the child process exited with status {child.returncode} without a result" + (f": {detail}" if detail else ""),
        elapsed,
    )


def emit_result(result: dict[str, Any]) -> None:
    """Print the result line :func:`run_child` reads (from the child process)."""
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def probe_model_file(
    path: Path, info: ModelInfo, config: BackendConfig, probe: ProbeConfig = ProbeConfig(), *, fmt: str = "gguf"
) -> ProbeResult:
    """Load ``path`` (of manifest format ``fmt``: see :func:`slmops.runtime.backends.open_backend`) in a child
    process and probe it there; a crash or a hang is a failed probe, not an exception.

    The child is killed after ``probe.load_timeout_s + probe.max_latency_s`` (plus a few seconds to start).
    """
    request = {
        "path": str(path),
        "format": fmt,
        "info": asdict(info),
        "config": asdict(config),
        "probe": asdict(probe),
    }
    timeout_s = probe.load_timeout_s + probe.max_latency_s + 10.0
    outcome = run_child("slmops.runtime.probe", request, timeout_s, child_env())
    if outcome.result is not None:
        return ProbeResult(**outcome.result)
    if "did not finish" in outcome.failure:
        return _fail(f"the probe did not finish within {timeout_s:g} s; the child process was killed")
    return _fail(
        outcome.failure.replace("the child process exited", "the probe process exited"), load_s=outcome.elapsed_s
    )


def _main() -> int:
    request = json.loads(sys.stdin.read())
    emit_result(asdict(_probe_in_this_process(request)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
