from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx


def test_slmops_serve_serves_a_gguf_file_until_terminated(tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    with subprocess.Popen(
        [sys.executable, "-m", "slmops", "serve", str(tiny_model), "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            match = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+)/v1", line)
            assert match, line
            with httpx.Client(base_url=match.group(1), timeout=30) as client:
                answer = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
            child.send_signal(signal.SIGTERM)
            _, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert answer["model"] == "tiny" and answer["usage"]["completion_tokens"] == 3
    assert child.returncode == 0, err


def test_slmops_serve_refuses_a_missing_file(tmp_path: Path) -> None:
    from slmops.cli import run

    assert run(["serve", str(tmp_path / "nothing.gguf")]) == 5


def test_slmops_serve_answers_to_the_reference_it_was_served_by(tiny_model: Path, tmp_path: Path) -> None:
    from slmops.config import Settings
    from slmops.registry import Registry

    home = tmp_path / "home"
    registry = Registry.open(Settings(home=home))
    try:
        registry.keys.init()
        registry.import_model(tiny_model, "tiny")
        registry.tag("tiny@v1", "stable")
    finally:
        registry.close()
    env = {**os.environ, "SLMOPS_HOME": str(home), "COLUMNS": "200"}
    argv = [sys.executable, "-m", "slmops", "serve", "tiny@stable", "--port", "0", "--threads", "1"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            match = re.search(r"serving tiny@v1 on (http://127\.0\.0\.1:\d+)/v1", line)
            assert match, line + (child.stderr.read() if child.stderr and child.poll() is not None else "")
            with httpx.Client(base_url=match.group(1), timeout=30) as client:
                statuses = {
                    name: client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})
                    for name in ("tiny@stable", "tiny@v1", "tiny", "tiny@v2")
                }
            child.send_signal(signal.SIGTERM)
            child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert {name: answer.status_code for name, answer in statuses.items()} == {
        "tiny@stable": 200,
        "tiny@v1": 200,
        "tiny": 200,
        "tiny@v2": 404,
    }
