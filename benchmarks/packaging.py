"""What a device installs and holds in memory for `slmops agent`: the agent extra's size and the agent's idle RSS.

    python -m benchmarks.packaging [--model gemma3-270m|tiny] [--idle-s 10] [--write]

Builds the wheel from this tree (``python -m build``), installs ``slmops[agent]`` into a new venv (no system
site-packages) and measures its site-packages (bytes of regular files, each counted once; per distribution from
pip's RECORD files). Then a real `slmops server` (from the development venv) and a real `slmops agent` from the
agent venv: the agent's resident memory (RSS and USS, the process and its children, median of 5 samples one second
apart after ``--idle-s`` seconds of quiet) once enrolled with no model, and again while it serves the model (after
one chat completion, then ``--idle-s`` quiet). ``--write`` replaces the packaging section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tests.packaging._env import (
    BLUEPRINT,
    SERVER_ONLY,
    build_dists,
    make_agent_venv,
    process_tree_rss,
    site_packages,
    start_agent,
    tree_bytes,
)
from tests.servers import free_port

from benchmarks._report import write_section

MiB = 1 << 20
SLMOPS = str(Path(sys.executable).with_name("slmops"))


def _per_distribution(site: Path) -> dict[str, int]:
    """Bytes per installed distribution, from the files its RECORD lists (pip adds the .pyc it compiled)."""
    sizes: dict[str, int] = {}
    for record in site.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0]
        total = 0
        for line in record.read_text().splitlines():
            path = site / line.split(",")[0]
            if path.is_file() and not path.is_symlink() and site in path.resolve().parents:
                total += path.stat().st_size
        sizes[name] = total
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def _cli(env: dict[str, str], *argv: str) -> Any:
    done = subprocess.run([SLMOPS, *argv, "--json"], env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"slmops {' '.join(argv)} failed: {done.stderr}")
    return json.loads(done.stdout)


def _wait(what: str, check: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def _rss(pid: int, idle_s: float) -> tuple[int, int]:
    time.sleep(idle_s)
    samples = []
    for _ in range(5):
        samples.append(process_tree_rss(pid))
        time.sleep(1)
    return int(statistics.median(s[0] for s in samples)), int(statistics.median(s[1] for s in samples))


def _register(home: Path, model: str, work: Path) -> str:
    from slmops.config import Settings
    from slmops.registry import Registry, pull

    registry = Registry.open(Settings(home=home))
    try:
        if model == "tiny":
            from tests.tiny_gguf import write_tiny_gguf

            envelope = registry.import_model(write_tiny_gguf(work / "tiny.gguf", seed=1), "tiny").envelope
        else:
            envelope = pull(registry, model).envelope
        registry.tag(f"{envelope.manifest.name}@{envelope.manifest.version}", "stable")
        return envelope.manifest.name
    finally:
        registry.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _chat(port: int) -> bool:
    try:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
    except httpx.TransportError:
        return False
    return answer.status_code == 200


def measure(work: Path, model: str, idle_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"model": model, "idle_s": idle_s}
    started = time.perf_counter()
    wheel, sdist = build_dists(work / "dist")
    result |= {"wheel_bytes": wheel.stat().st_size, "sdist_bytes": sdist.stat().st_size, "wheel": wheel.name}
    result["build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    bin_dir = make_agent_venv(wheel, work / "agent-venv")
    result["install_s"] = time.perf_counter() - started
    site = site_packages(work / "agent-venv")
    result["site_packages_bytes"] = tree_bytes(site)
    result["distributions"] = _per_distribution(site)
    dev_site = site_packages(Path(sys.executable).parents[1])
    result["dev_site_packages_bytes"] = tree_bytes(dev_site)
    result["server_only_absent"] = [m for m in SERVER_ONLY if not list(site.glob(f"{m}/__init__.py"))]
    helps = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(bin_dir / "slmops"), "agent", "--help"], capture_output=True, check=True, timeout=60)
        helps.append(time.perf_counter() - t0)
    result["help_s"] = statistics.median(helps)

    home = work / "server-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env["SLMOPS_HOME"] = str(home)
    port, log = free_port(), work / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        server = subprocess.Popen([SLMOPS, "server", "--port", str(port)], stdout=out, stderr=out, env=env)
    agent = None
    try:
        _wait("the server", lambda: _healthy(url), 60, log)
        # registered before the agent enrolls: enrollment hands the agent the registry's signing key
        name = _register(home, model, work)
        env |= {
            "SLMOPS_SERVER_URL": url,
            "SLMOPS_TOKEN": _cli(env, "token", "create", "--role", "admin", "--name", "bench")["token"],
        }
        enroll = _cli(env, "enroll-token", "create", "--auto-approve")["token"]
        api_port, agent_log = free_port(), work / "agent.log"
        agent = start_agent(bin_dir, url, enroll, work / "agent", api_port, agent_log)
        headers = {"Authorization": f"Bearer {env['SLMOPS_TOKEN']}"}

        def enrolled() -> bool:
            return len(httpx.get(f"{url}/api/v1/devices", headers=headers, timeout=10).json()) == 1

        _wait("the agent to enroll", enrolled, 60, agent_log)
        result["rss_enrolled_bytes"], result["uss_enrolled_bytes"] = _rss(agent.pid, idle_s)
        (work / "blueprint.yaml").write_text(BLUEPRINT.format(model=name))
        subprocess.run([SLMOPS, "apply", "-f", str(work / "blueprint.yaml")], env=env, check=True, capture_output=True)
        started = time.perf_counter()
        _wait("the agent to serve the model", lambda: _chat(api_port), 600, agent_log)
        result["to_serving_s"] = time.perf_counter() - started
        result["rss_serving_bytes"], result["uss_serving_bytes"] = _rss(agent.pid, idle_s)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        server.kill()
        server.wait()
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    top = list(result["distributions"].items())[:10]
    rest = result["site_packages_bytes"] - sum(size for _name, size in top)
    lines = [
        "## Packaging: the agent install and its idle memory",
        "",
        f"`pip install '{result['wheel']}[agent]'` into a new venv (no system site-packages): "
        f"**{result['site_packages_bytes'] / MiB:.0f} MiB** of site-packages, {len(result['distributions'])} "
        f"distributions, installed in {result['install_s']:.0f} s (llama-cpp-python from pip's wheel cache). "
        f"The development venv with every extra of the Makefile holds {result['dev_site_packages_bytes'] / MiB:,.0f} "
        f"MiB. Absent from the agent venv, as they should be: {', '.join(result['server_only_absent'])}. "
        f"`slmops agent --help` takes {result['help_s']:.2f} s there (median of 3).",
        "",
        "| distribution | MiB |",
        "|---|---:|",
        *[f"| {name} | {size / MiB:.1f} |" for name, size in top],
        f"| the other {len(result['distributions']) - len(top)} | {rest / MiB:.1f} |",
        "",
        f"Wheel {result['wheel_bytes'] / 1024:.0f} KiB, sdist {result['sdist_bytes'] / 1024:.0f} KiB "
        f"(built in {result['build_s']:.0f} s).",
        "",
        f"Idle memory of that `slmops agent` (process and children; median of 5 samples 1 s apart after "
        f"{result['idle_s']:g} s quiet), enrolled with a real `slmops server` on loopback:",
        "",
        "| state | RSS MiB | USS MiB |",
        "|---|---:|---:|",
        f"| enrolled, no model | {result['rss_enrolled_bytes'] / MiB:.0f} | {result['uss_enrolled_bytes'] / MiB:.0f} |",
        f"| serving {result['model']} (after one chat completion) | {result['rss_serving_bytes'] / MiB:.0f} | "
        f"{result['uss_serving_bytes'] / MiB:.0f} |",
        "",
        f"From the blueprint's apply to the first answer on the local API: {result['to_serving_s']:.0f} s (download, "
        "verify, probe, start). The model file is mapped, so RSS counts the weights pages touched so far.",
        "",
        f"Measured {result['measured_at']} on {result['machine']}. Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="gemma3-270m (the default model) or tiny")
    parser.add_argument("--idle-s", type=float, default=10.0, help="quiet seconds before sampling (default 10)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the venv, logs and homes here")
    parser.add_argument("--write", action="store_true", help="replace the packaging section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = ("python -m benchmarks.packaging " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    with tempfile.TemporaryDirectory(prefix="slmops-packaging-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(work, args.model, args.idle_s)
    result["measured_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    section = markdown(result, command)
    print(section)
    if args.write:
        write_section(section, "packaging")
    return 0


if __name__ == "__main__":
    sys.exit(main())
