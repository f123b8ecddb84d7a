"""Choose a model's serving configuration by measuring it on the device, not by rule.

The same model on the same 2-core machine decodes at ~75 tokens/s with one llama.cpp thread, ~68 with two threads
spinning and half that with two threads and ``OMP_WAIT_POLICY=passive``; another machine needs another choice. So
the device measures a few candidate configurations and keeps the best:

- :func:`candidates`: threads 1..cores (pruned to 1, 2, 4, ..., cores/2, cores-1, cores on bigger machines), the
  OpenMP wait policy ``active``/``passive`` for more than one thread (one thread runs no OpenMP team, so its policy
  is ``None``) at the default batch size first, then the alternative batch sizes at one thread and at all cores.
  A policy the user set in the environment is the only one measured.
- :func:`measure`: the candidates run in child processes (:func:`slmops.runtime.probe.run_child`), because the
  policy only counts when the OpenMP runtime loads, i.e. when the process starts. Consecutive candidates share a
  child when they share a policy and threads do not decrease (:func:`child_groups`: the idle threads of a bigger
  spinning team would steal the cores of a smaller one). A child loads the model once per candidate, warms up,
  then times a fixed prompt of ``prompt_tokens`` tokens (prefill tokens/s)
  and ``decode_tokens`` greedy tokens after it (decode tokens/s). The whole search stops at ``budget_s``: the first
  candidate is always measured, then no candidate starts after the deadline and a decode still running at the
  deadline stops after 4 tokens (its rate is what it decoded); what was not measured is listed.
- :func:`choose` (pure): the best decode; among candidates within ``tolerance`` (3%) of it, the best prefill;
  among those within the tolerance of that, the fewest threads, then ``passive`` (kinder to the device's other
  work), then the larger batch.
- :class:`TuningStore`: the result persisted atomically (``tuning.json`` in the agent's data directory) keyed by
  the model digest and a device fingerprint (:func:`device_fingerprint`: CPU count and model, memory,
  llama-cpp-python version, architecture, a user-set wait policy), so it is reused across restarts and measured
  again when the model or the device changes.

How the serving process gets the wait policy: it must be in the environment before the first ``import llama_cpp``
of the process (:func:`slmops.runtime.backend._import_llama_cpp` falls back to ``passive`` only when nothing set
it). Measuring happens in children, so the serving process is still free to :func:`apply_wait_policy` of the
chosen tuning before it loads the model (``slmops serve --threads auto``, the agent's first serve). A process
that already loaded llama.cpp with another policy cannot change it: :func:`realizable` then picks the best
*measured* candidate this process can run, and the agent restarts itself at a safe point when that is worse than
the chosen one (see :mod:`slmops.agent.daemon`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.core.wire import RuntimeTuning
from slmops.errors import ConfigError, RuntimeBackendError

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "Candidate",
    "Measurement",
    "TuningConfig",
    "TuningOutcome",
    "TuningRecord",
    "TuningStore",
    "apply_wait_policy",
    "candidates",
    "child_groups",
    "choose",
    "device_fingerprint",
    "loaded_wait_policy",
    "measure",
    "process_wait_policy",
    "realizable",
    "thread_counts",
    "tune",
    "user_wait_policy",
    "wait_policy_env",
]

WaitPolicy = Literal["active", "passive", "bounded"]
# what each policy costs a device while it is idle: passive threads sleep at once; bounded ones (OMP_WAIT_POLICY
# unset: GNU OpenMP spins about 3 ms, LLVM's 200 ms, then sleeps) after a short spin; active ones spin for minutes
# (GNU OpenMP: about 5 minutes after the last parallel region, a whole core per thread: measured 100% of a core on
# an idle agent here). Among measured equals the lower rank wins.
_IDLE_COST: dict[str | None, int] = {None: 0, "passive": 0, "bounded": 1, "active": 2}
DEFAULT_BATCH_TOKENS = 512
# set with OMP_WAIT_POLICY by apply_wait_policy and by _import_llama_cpp's fallback: "slmops chose it, not the user"
_SET_MARK = "SLMOPS_SET_OMP_WAIT_POLICY"
_PROMPT_TEXT = (
    "The harbour master walked along the quay at dawn, counting the boats that had come in overnight and noting "
    "the weather, the tide and the state of the nets. "
)
_MAX_RECORDS = 32


@dataclass(frozen=True, order=True)
class Candidate:
    threads: int
    omp_wait_policy: WaitPolicy | None  # None: one thread, no OpenMP team
    batch_tokens: int = DEFAULT_BATCH_TOKENS

    def label(self) -> str:
        return f"threads={self.threads} wait={self.omp_wait_policy or '-'} batch={self.batch_tokens}"


@dataclass(frozen=True)
class Measurement:
    candidate: Candidate
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    # what the child process reported about itself: the wait policy in its environment, llama.cpp's thread count
    child_wait_policy: str | None = None
    child_threads: int | None = None


@dataclass(frozen=True)
class TuningConfig:
    budget_s: float = 30.0  # the whole search; 0 turns tuning off
    prompt_tokens: int = 160
    decode_tokens: int = 32
    batch_sizes: tuple[int, ...] = (DEFAULT_BATCH_TOKENS, 128)
    tolerance: float = 0.03  # "as good as the best" within this fraction
    context_tokens: int = 512  # the measuring context; at least prompt_tokens + decode_tokens + 8
    child_timeout_s: float = 120.0  # a child that takes longer (a hang) is killed

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.prompt_tokens < 8 or self.decode_tokens < 2 or not self.batch_sizes:
            raise ValueError(
                "TuningConfig needs budget_s >= 0, prompt_tokens >= 8, decode_tokens >= 2 and a batch size; got "
                f"{self.budget_s}, {self.prompt_tokens}, {self.decode_tokens}, {self.batch_sizes}"
            )
        if self.context_tokens < self.prompt_tokens + self.decode_tokens + 8:
            object.__setattr__(self, "context_tokens", self.prompt_tokens + self.decode_tokens + 8)


@dataclass(frozen=True)
class TuningOutcome:
    tuning: RuntimeTuning
    measurements: tuple[Measurement, ...]
    not_measured: tuple[Candidate, ...]  # cut by the time budget
    failures: tuple[str, ...] = ()  # children that gave no result, and why
    reused: bool = False  # read from the store, not measured now


# ----------------------------------------------------------------------------------------------- candidates (pure)


def thread_counts(cores: int) -> list[int]:
    """1..cores for up to 4 cores; else 1, 2, 4, ... up to cores/2, then cores-1 and cores."""
    cores = max(1, cores)
    if cores <= 4:
        return list(range(1, cores + 1))
    counts = {1, cores - 1, cores}
    power = 2
    while power <= cores // 2:
        counts.add(power)
        power *= 2
    counts.add(cores // 2)
    return sorted(counts)


def candidates(
    cores: int,
    *,
    batch_sizes: Sequence[int] = (DEFAULT_BATCH_TOKENS, 128),
    policies: Sequence[WaitPolicy] = ("passive", "bounded", "active"),
) -> list[Candidate]:
    """The configurations to measure, most telling first, so a short budget still compares threads and policies:
    every thread count and policy at the first batch size (one thread first, then ascending threads per policy),
    then each further batch size at one thread and at the most threads only."""
    counts = thread_counts(cores)
    batches = list(dict.fromkeys(batch_sizes))
    out: list[Candidate] = []
    for phase, sizes in enumerate((batches[:1], batches[1:])):
        threads_tried = counts if phase == 0 else sorted({1, counts[-1]})
        for batch in sizes:
            for index, policy in enumerate(dict.fromkeys(policies)):
                for threads in threads_tried:
                    if threads == 1 and index > 0:
                        continue
                    out.append(Candidate(threads, None if threads == 1 else policy, batch))
    return out


def child_groups(cands: Sequence[Candidate]) -> list[tuple[WaitPolicy | None, list[Candidate]]]:
    """Consecutive candidates that can share one child process: one wait policy (one-thread candidates join any),
    threads never fewer than before (the idle threads of a bigger, spinning OpenMP team would steal the cores of a
    smaller one)."""
    groups: list[tuple[WaitPolicy | None, list[Candidate]]] = []
    for cand in cands:
        policy = cand.omp_wait_policy
        if groups:
            group_policy, members = groups[-1]
            fits = policy is None or group_policy in (None, policy)
            if fits and cand.threads >= members[-1].threads:
                members.append(cand)
                if group_policy is None and policy is not None:
                    groups[-1] = (policy, members)
                continue
        groups.append((policy, [cand]))
    return groups


def choose(
    measurements: Sequence[Measurement],
    *,
    model_digest: str = "",
    measured_at: int = 0,
    tolerance: float = 0.03,
    runtime: str = "llama.cpp",
) -> RuntimeTuning:
    """The best measured configuration: highest decode tokens/s; within ``tolerance`` of it the highest prefill;
    within ``tolerance`` of that the fewest threads, then the policy that costs an idle device least (``passive``,
    ``bounded``, ``active``), then the larger batch."""
    usable = [m for m in measurements if m.decode_tokens_per_s > 0]
    if not usable:
        raise RuntimeBackendError(
            f"no candidate configuration produced a measurement ({len(measurements)} tried); expected at least one "
            "that loads and decodes: check that the model serves with `slmops serve MODEL --threads 1`"
        )
    best_decode = max(m.decode_tokens_per_s for m in usable)
    near = [m for m in usable if m.decode_tokens_per_s >= best_decode * (1 - tolerance)]
    best_prefill = max(m.prefill_tokens_per_s for m in near)
    near = [m for m in near if m.prefill_tokens_per_s >= best_prefill * (1 - tolerance)]
    winner = min(
        near,
        key=lambda m: (
            m.candidate.threads,
            _IDLE_COST[m.candidate.omp_wait_policy],
            -m.candidate.batch_tokens,
            -m.decode_tokens_per_s,
        ),
    )
    return RuntimeTuning(
        runtime=runtime,
        model_digest=model_digest,
        threads=winner.candidate.threads,
        omp_wait_policy=winner.candidate.omp_wait_policy,
        batch_tokens=winner.candidate.batch_tokens,
        decode_tokens_per_s=round(winner.decode_tokens_per_s, 3),
        prefill_tokens_per_s=round(winner.prefill_tokens_per_s, 3),
        candidates_measured=min(256, max(1, len(measurements))),
        measured_at=measured_at,
    )


def realizable(
    tuning: RuntimeTuning, measurements: Sequence[Measurement], loaded: str | None, *, tolerance: float = 0.03
) -> RuntimeTuning:
    """What a process whose OpenMP runtime already loaded with wait policy ``loaded`` should serve with: ``tuning``
    when its policy does not matter (one thread) or is the loaded one, else the best measured candidate it can run
    (one thread, or the loaded policy), chosen by :func:`choose`'s rule."""
    if tuning.omp_wait_policy is None or tuning.omp_wait_policy == loaded:
        return tuning
    fits = [m for m in measurements if m.candidate.omp_wait_policy in (None, loaded)]
    if not fits:
        known = loaded if loaded in ("active", "passive", "bounded") else None
        return tuning.model_copy(update={"omp_wait_policy": known})
    return choose(
        fits,
        model_digest=tuning.model_digest,
        measured_at=tuning.measured_at,
        tolerance=tolerance,
        runtime=tuning.runtime,
    ).model_copy(update={"candidates_measured": tuning.candidates_measured})


# ----------------------------------------------------------------------------------------------- the process's policy


def user_wait_policy() -> WaitPolicy | None:
    """``OMP_WAIT_POLICY`` when the user set it (not :func:`apply_wait_policy`), lower-cased; None otherwise."""
    value = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    if value not in ("active", "passive") or os.environ.get(_SET_MARK) == value:
        return None
    return "active" if value == "active" else "passive"


def process_wait_policy() -> str:
    """The wait policy this process's OpenMP runtime runs (or will run) with: the environment's ``OMP_WAIT_POLICY``,
    ``bounded`` when a measurement chose the runtime's default, else ``passive`` (the fallback of
    :func:`slmops.runtime.backend._import_llama_cpp`)."""
    value = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    if value:
        return value
    return "bounded" if os.environ.get(_SET_MARK) == "bounded" else "passive"


def loaded_wait_policy() -> str | None:
    """The wait policy this process's OpenMP runtime loaded with, or None while llama.cpp is not imported."""
    if "llama_cpp" not in sys.modules:
        return None
    return os.environ.get("OMP_WAIT_POLICY", "").strip().lower() or (
        "bounded" if os.environ.get(_SET_MARK) == "bounded" else None
    )


def wait_policy_env(policy: str | None, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that should run ``policy`` (None: keep the inherited one, else ``passive``):
    ``OMP_WAIT_POLICY`` set, or removed for ``bounded`` (the OpenMP runtime's default) with the mark that stops the
    passive fallback."""
    chosen = policy or env.get("OMP_WAIT_POLICY") or "passive"
    if chosen == "bounded":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = chosen
    env[_SET_MARK] = chosen.lower()
    return env


def apply_wait_policy(policy: str | None) -> bool:
    """Put ``policy`` in this process's environment for the OpenMP runtime to read when llama.cpp loads. Does
    nothing (returns False) once llama.cpp is imported, when ``policy`` is None, or when the user set a policy."""
    if policy is None or "llama_cpp" in sys.modules or user_wait_policy() is not None:
        return False
    if policy == "bounded":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
    os.environ[_SET_MARK] = policy
    return True


# ----------------------------------------------------------------------------------------------- device fingerprint


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model"):
                return value.strip()[:120]
    return platform.processor()[:120]


def device_fingerprint() -> dict[str, Any]:
    """What a measurement depends on besides the model; a change means measuring again. Never imports llama_cpp
    (that would load the OpenMP runtime in this process)."""
    from importlib import metadata

    import psutil

    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": _cpu_model(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "arch": platform.machine(),
        "llama_cpp_python": version,
        "user_omp_wait_policy": user_wait_policy(),
    }


def _key(model_digest: str, fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return f"{model_digest}|{hashlib.sha256(blob).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------- persistence


class TuningRecord(BaseModel):
    """One persisted outcome: the choice, the device it was measured on and every measurement."""

    model_config = ConfigDict(frozen=True)

    tuning: RuntimeTuning
    fingerprint: dict[str, Any]
    measurements: list[dict[str, Any]] = Field(default_factory=list)
    not_measured: list[dict[str, Any]] = Field(default_factory=list)

    def parsed_measurements(self) -> list[Measurement]:
        return [Measurement(**{**m, "candidate": Candidate(**m["candidate"])}) for m in self.measurements]


class _StoreFile(BaseModel):
    schema_version: int = 1
    records: dict[str, TuningRecord] = Field(default_factory=dict)


class TuningStore:
    """``tuning.json``: :class:`TuningRecord` by (model digest, device fingerprint), the newest 32, written
    atomically (temp file, fsync, replace, fsync of the directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> _StoreFile:
        try:
            return _StoreFile.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return _StoreFile()
        except ValidationError as exc:
            raise ConfigError(
                f"the tuning file {self.path} is not valid ({exc.error_count()} problem(s)); delete it to measure again"
            ) from None

    def get(self, model_digest: str, fingerprint: dict[str, Any]) -> TuningRecord | None:
        return self._load().records.get(_key(model_digest, fingerprint))

    def put(self, outcome: TuningOutcome, fingerprint: dict[str, Any]) -> TuningRecord:
        record = TuningRecord(
            tuning=outcome.tuning,
            fingerprint=fingerprint,
            measurements=[asdict(m) for m in outcome.measurements],
            not_measured=[asdict(c) for c in outcome.not_measured],
        )
        data = self._load()
        data.records[_key(outcome.tuning.model_digest, fingerprint)] = record
        newest = sorted(data.records.items(), key=lambda kv: kv[1].tuning.measured_at, reverse=True)[:_MAX_RECORDS]
        data.records = dict(newest)
        self._write(data.model_dump_json(indent=1).encode())
        return record

    def _write(self, payload: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ----------------------------------------------------------------------------------------------- measuring


def measure(
    model_path: Path,
    cands: Sequence[Candidate],
    config: TuningConfig,
    *,
    lora_path: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Measurement], list[Candidate], list[str]]:
    """Measure ``cands`` in child processes within ``config.budget_s``: (measurements, not measured, failures)."""
    from slmops.runtime.probe import child_env, run_child

    start = clock()
    measured: list[Measurement] = []
    failures: list[str] = []
    done: set[Candidate] = set()
    for policy, members in child_groups(cands):
        remaining = config.budget_s - (clock() - start)
        if measured and remaining <= 0:
            break
        inherited = os.environ.get("OMP_WAIT_POLICY") or ("bounded" if os.environ.get(_SET_MARK) == "bounded" else None)
        env = wait_policy_env(policy or inherited, child_env())
        request = {
            "path": str(model_path),
            "lora_path": str(lora_path) if lora_path else None,
            "candidates": [asdict(c) for c in members],
            "budget_s": max(0.0, remaining),
            "always_first": not measured,
            "prompt_tokens": config.prompt_tokens,
            "decode_tokens": config.decode_tokens,
            "context_tokens": config.context_tokens,
        }
        timeout_s = min(config.child_timeout_s, max(remaining, 0.0) + 60.0)
        outcome = run_child("slmops.runtime.tuning", request, timeout_s, env)
        if outcome.result is None:
            failures.append(f"{policy or 'one thread'}: {outcome.failure}")
            done.update(members)  # tried; a crash for one policy does not stop the other
            continue
        for item in outcome.result["measurements"]:
            cand = Candidate(**item.pop("candidate"))
            measured.append(Measurement(candidate=cand, **item))
            done.add(cand)
        for text in outcome.result.get("failures", []):
            failures.append(str(text))
        done.update(Candidate(**c) for c in outcome.result.get("failed", []))
    not_measured = [c for c in cands if c not in done]
    return measured, not_measured, failures


def tune(
    model_path: Path,
    model_digest: str,
    *,
    cores: int | None = None,
    config: TuningConfig = TuningConfig(),
    store: TuningStore | None = None,
    lora_path: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> TuningOutcome:
    """The tuning of ``model_digest`` on this device: the stored one when the fingerprint matches, else measured
    (within ``config.budget_s``), chosen and stored. Raises :class:`RuntimeBackendError` when nothing measured."""
    fingerprint = device_fingerprint()
    if store is not None:
        record = store.get(model_digest, fingerprint)
        if record is not None:
            return TuningOutcome(
                record.tuning,
                tuple(record.parsed_measurements()),
                tuple(Candidate(**c) for c in record.not_measured),
                reused=True,
            )
    user = user_wait_policy()
    cands = candidates(
        cores or os.cpu_count() or 1,
        batch_sizes=config.batch_sizes,
        policies=(user,) if user else ("passive", "bounded", "active"),
    )
    measured, not_measured, failures = measure(model_path, cands, config, lora_path=lora_path, clock=clock)
    if not measured:
        raise RuntimeBackendError(
            f"tuning measured none of {len(cands)} configurations of {model_path.name}: "
            + ("; ".join(failures) or "no result")
            + "; expected a model that loads and decodes (set the tuning budget to 0 to serve without measuring)"
        )
    tuning = choose(measured, model_digest=model_digest, measured_at=int(wall_clock()), tolerance=config.tolerance)
    outcome = TuningOutcome(tuning, tuple(measured), tuple(not_measured), tuple(failures))
    if store is not None:
        store.put(outcome, fingerprint)
    return outcome


# ----------------------------------------------------------------------------------------------- the child process


def _prompt_tokens(llama: Any, count: int) -> list[int]:
    tokens: list[int] = llama.tokenize(_PROMPT_TEXT.encode(), add_bos=True, special=False)
    body = tokens[1:] or [max(0, llama.token_eos() - 1)]
    while len(tokens) < count:
        tokens.extend(body)
    return tokens[:count]


def _measure_one(request: dict[str, Any], cand: Candidate, deadline: float) -> dict[str, Any]:
    from slmops.runtime.backend import BackendConfig, LlamaCppBackend

    lora = request.get("lora_path")
    backend = LlamaCppBackend.load(
        Path(request["path"]),
        "tuning",
        BackendConfig(
            context_tokens=int(request["context_tokens"]),
            threads=cand.threads,
            batch_tokens=cand.batch_tokens,
            prompt_nll_sample_rate=0.0,
            lora_path=Path(lora) if lora else None,
        ),
    )
    try:
        llama: Any = backend._llama  # timing needs llama.cpp's token-level generator
        import llama_cpp

        threads = int(llama_cpp.llama_n_threads(llama._ctx.ctx))
        tokens = _prompt_tokens(llama, int(request["prompt_tokens"]))
        decode = int(request["decode_tokens"])
        for _ in zip(range(2), llama.generate(tokens[:8][::-1], temp=0.0, top_k=1), strict=False):
            pass  # warm-up: load the weights into the caches, start the threads
        llama.reset()
        begin = time.monotonic()
        generator = llama.generate(tokens, temp=0.0, top_k=1)
        next(generator)  # the prompt is evaluated and one token sampled
        first = time.monotonic()
        decoded = 1
        for _ in zip(range(decode - 1), generator, strict=False):
            decoded += 1  # greedy tokens, end-of-generation or not
            if decoded >= 4 and time.monotonic() > deadline:
                break  # over the budget: the rate of what was decoded so far
        end = time.monotonic()
        generator.close()
    finally:
        backend.close()
    return {
        "candidate": asdict(cand),
        "prefill_tokens_per_s": len(tokens) / max(first - begin, 1e-9),
        "decode_tokens_per_s": (decoded - 1) / max(end - first, 1e-9),
        "child_wait_policy": loaded_wait_policy(),
        "child_threads": threads,
    }


def _main() -> int:
    from slmops.errors import SLMOpsError
    from slmops.runtime.probe import emit_result

    request = json.loads(sys.stdin.read())
    deadline = time.monotonic() + float(request["budget_s"])
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    failed: list[dict[str, Any]] = []
    first = bool(request.get("always_first"))
    for item in request["candidates"]:
        if time.monotonic() >= deadline and not (first and not results and not failed):
            break
        cand = Candidate(**item)
        try:
            results.append(_measure_one(request, cand, deadline))
        except (SLMOpsError, ValueError, RuntimeError, OSError) as exc:
            failures.append(f"{cand.label()}: {type(exc).__name__}: {exc}"[:500])
            failed.append(asdict(cand))
    emit_result({"measurements": results, "failures": failures, "failed": failed})
    return 0


if __name__ == "__main__":
    sys.exit(_main())
