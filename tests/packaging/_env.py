"""Building slmops' distributions and installing the agent into a fresh virtual environment (tests and benchmark).

The fresh environment is made by ``python3.11 -m venv`` without ``--system-site-packages``: it sees only what
``pip install 'slmops[agent]'`` put there, which is the point. pip fetches from the configured package index;
llama-cpp-python is compiled once (with the Makefile's portable CMAKE_ARGS) and reused from pip's wheel cache after.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = [
    "LLAMA_CMAKE_ARGS",
    "REPO",
    "SERVER_ONLY",
    "build_dists",
    "cached_wheel_dirs",
    "make_agent_venv",
    "site_packages",
    "tree_bytes",
    "wheel_names",
]

REPO = Path(__file__).resolve().parents[2]
# as in the Makefile: a portable AVX2 build on x86_64 (a native one may use instructions the hypervisor traps)
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    if platform.machine() == "x86_64"
    else ""
)
# import names that a device must not get with the agent extra (the server, optimize, postgres, s3, privacy extras)
SERVER_ONLY = ("torch", "transformers", "peft", "scipy", "matplotlib", "tenacity", "psycopg", "boto3", "opendp")


def build_dists(out_dir: Path) -> tuple[Path, Path]:
    """``python -m build`` of the repository (sdist, then the wheel built from that sdist) into ``out_dir``.

    ``--no-isolation`` builds with this interpreter's setuptools, so no build environment is downloaded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out_dir), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -m build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    (wheel,) = out_dir.glob("slmops-*.whl")
    (sdist,) = out_dir.glob("slmops-*.tar.gz")
    return wheel, sdist


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def cached_wheel_dirs() -> list[Path]:
    """Directories of llama-cpp-python wheels pip built before (its wheel cache), as extra ``--find-links``."""
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip")) / "wheels"
    return sorted({p.parent for p in cache.glob("**/llama_cpp_python-*.whl")}) if cache.is_dir() else []


def make_agent_venv(wheel: Path, venv: Path, python: str | None = None, timeout_s: float = 1800) -> Path:
    """A new venv at ``venv`` with ``wheel[agent]`` installed; returns its ``bin`` directory."""
    python = python or shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    bin_dir = venv / "bin"
    find_links = [arg for d in cached_wheel_dirs() for arg in ("--find-links", str(d))]
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *find_links, f"{wheel}[agent]"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {wheel.name}[agent] failed:\n{done.stderr[-4000:]}")
    return bin_dir


def site_packages(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3*/site-packages")
    return path


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed, each file counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if (info.st_dev, info.st_ino) not in seen and not os.path.islink(os.path.join(root, name)):
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: packaging}}
spec:
  selector: {{labels: {{site: packaging}}}}
  model: {{name: {model}, ref: stable}}
  runtime: {{threads: 1, context_tokens: 256}}
"""


def start_agent(
    bin_dir: Path, url: str, enroll_token: str, data_dir: Path, api_port: int, log: Path
) -> subprocess.Popen[bytes]:
    """A real `slmops agent` from ``bin_dir`` (labels site=packaging), polling every half second."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLMOPS_", "PYTHON", "VIRTUAL_ENV"))}
    env["SLMOPS_HOME"] = str(data_dir.parent / "agent-home")
    argv = [str(bin_dir / "slmops"), "agent", "--server", url, "--enroll-token", enroll_token]
    argv += ["--data-dir", str(data_dir), "--label", "site=packaging", "--api-port", str(api_port)]
    argv += ["--poll-interval-s", "0.5", "--probation-s", "1", "--health-interval-s", "5"]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def process_tree_rss(pid: int) -> tuple[int, int]:
    """(RSS, USS) bytes of process ``pid`` and its children."""
    import psutil

    root = psutil.Process(pid)
    rss = uss = 0
    for proc in [root, *root.children(recursive=True)]:
        info = proc.memory_full_info()
        rss += info.rss
        uss += info.uss
    return rss, uss
