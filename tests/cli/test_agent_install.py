"""`slmops agent install` writes the agent's systemd unit, its config and its enrollment token under a root.

The last test runs what the written unit would run: its ExecStart= expanded the way systemd does it (specifiers
%S and %d, ${VAR} and $VAR from the EnvironmentFile=, the token handed over as a credential), as a real agent
process that enrolls with a real `slmops server`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from slmops.cli import run
from slmops.cli.agent import DEFAULT_EXE, NEXT_STEPS, render_agent_unit
from tests.servers import running_server

REPO = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("slmops"))


def _token_file(tmp_path: Path, token: str = "enroll-T0K3N", mode: int = 0o600) -> Path:
    path = tmp_path / "token.txt"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def _install(root: Path, *extra: str) -> list[str]:
    return ["agent", "install", "--server", "http://cp.example:8080/", "--root", str(root), "--exe", EXE, *extra]


def test_install_writes_the_unit_the_config_and_a_private_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    root = tmp_path / "root"
    token = _token_file(tmp_path)
    argv = _install(root, "--enroll-token-file", str(token), "--label", "site=berlin-3", "--api-port", "8089")

    # Execute
    code = run([*argv, "--json"])

    # Assert
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    unit = root / "etc/systemd/system/slmops-agent.service"
    env = root / "etc/slmops/agent.env"
    secret = root / "etc/slmops/agent-enroll-token"
    assert out["unit"] == str(unit) and out["next_steps"] == NEXT_STEPS
    assert secret.read_text() == "enroll-T0K3N\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(env.stat().st_mode) == 0o644
    assert "T0K3N" not in env.read_text() and "T0K3N" not in unit.read_text()
    assert "SLMOPS_AGENT_SERVER=http://cp.example:8080\n" in env.read_text()
    assert "SLMOPS_AGENT_ARGS=--label site=berlin-3 --api-port 8089\n" in env.read_text()
    assert unit.read_text() == render_agent_unit(EXE)
    assert f"ExecStart={EXE} agent" in unit.read_text()


def test_install_again_replaces_the_files_and_says_what_to_run_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    assert run(_install(root, "--enroll-token", "first")) == 0
    (root / "etc/slmops/agent-enroll-token").chmod(0o644)  # widened by hand meanwhile
    capsys.readouterr()

    assert run(_install(root, "--enroll-token", "second", "--feedback-opt-in")) == 0

    out = capsys.readouterr().out
    secret = root / "etc/slmops/agent-enroll-token"
    assert secret.read_text() == "second\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "SLMOPS_AGENT_ARGS=--feedback-opt-in\n" in (root / "etc/slmops/agent.env").read_text()
    assert NEXT_STEPS in out and str(root) in out


def test_the_packaged_agent_unit_is_what_install_writes() -> None:
    assert (REPO / "packaging/systemd/slmops-agent.service").read_text() == render_agent_unit(DEFAULT_EXE)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one of --enroll-token"),
        (["--enroll-token", "a", "--enroll-token-file", "/x"], "exactly one of --enroll-token"),
        (["--enroll-token", "a b"], "one word"),
        (["--enroll-token", "t", "--label", "site=two words"], "cannot go into agent.env"),
        (["--enroll-token", "t", "--label", "nolabel"], "KEY=VALUE"),
        (["--enroll-token", "t", "--exe", "slmops"], "absolute path"),
        (["--enroll-token", "t", "--exe", "/home/me/.venv/bin/slmops"], "ProtectHome"),
    ],
)
def test_install_refuses_what_the_unit_could_not_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    root = tmp_path / "root"
    argv = ["agent", "install", "--server", "http://cp:8080", "--root", str(root)]
    if "--exe" not in extra:
        argv += ["--exe", EXE]

    code = run([*argv, *extra])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (root / "etc").exists()


@pytest.mark.parametrize("server", ["cp:8080", "ftp://cp", "http://cp:8080/$x"])
def test_install_refuses_a_server_that_is_not_an_http_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: str
) -> None:
    argv = ["agent", "install", "--server", server, "--enroll-token", "t", "--root", str(tmp_path), "--exe", EXE]

    assert run(argv) == 2

    assert "--server must be the control plane's http(s) URL" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["agent", "install"], ["agent"]])
def test_a_token_file_others_can_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    token = _token_file(tmp_path, mode=0o644)
    argv = [*command, "--server", "http://127.0.0.1:9", "--enroll-token-file", str(token)]
    if command == ["agent"]:
        argv += ["--data-dir", str(tmp_path / "agent"), "--once"]
    else:
        argv += ["--root", str(tmp_path / "root"), "--exe", EXE]

    code = run(argv)

    assert code == 2
    assert f"has mode 0644, so other users can read it; expected 0600 or stricter (run `chmod 600 {token}`)" in (
        capsys.readouterr().err
    )


def test_the_agent_takes_one_token_option_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["agent", "--server", "http://127.0.0.1:9", "--enroll-token", "t"]
    argv += ["--enroll-token-file", str(_token_file(tmp_path)), "--data-dir", str(tmp_path / "a"), "--once"]

    assert run(argv) == 2

    assert "--enroll-token or --enroll-token-file, not both" in capsys.readouterr().err


def _environment_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _exec_start(unit: str, env: dict[str, str], state_dir: Path, credentials: Path) -> list[str]:
    """ExecStart= of ``unit`` expanded as systemd does: %S, %d; ``${VAR}`` one word; ``$VAR`` split on spaces."""
    joined = unit.replace("\\\n", " ")
    (line,) = [raw for raw in joined.splitlines() if raw.startswith("ExecStart=")]
    words: list[str] = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        word = word.replace("%S", str(state_dir)).replace("%d", str(credentials))
        whole = re.fullmatch(r"\$([A-Z_]+)", word)
        if whole:
            words += env.get(whole.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def test_the_installed_unit_command_enrolls_a_real_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a real server, an admin and an enrollment token, the agent installed under a root.
    with running_server(tmp_path / "server.log") as url:
        assert run(["token", "create", "--role", "admin", "--name", "root", "--json"]) == 0
        admin = json.loads(capsys.readouterr().out)["token"]
        monkeypatch.setenv("SLMOPS_SERVER_URL", url)
        monkeypatch.setenv("SLMOPS_TOKEN", admin)
        assert run(["enroll-token", "create", "--auto-approve", "--json"]) == 0
        enroll = json.loads(capsys.readouterr().out)["token"]
        root = tmp_path / "root"
        installed = ["agent", "install", "--server", url, "--enroll-token-file", str(_token_file(tmp_path, enroll))]
        assert run([*installed, "--label", "site=unit", "--root", str(root), "--exe", EXE]) == 0
        env_path = root / "etc/slmops/agent.env"
        env_path.write_text(env_path.read_text().replace("SLMOPS_AGENT_ARGS=", "SLMOPS_AGENT_ARGS=--once "))
        # what systemd does before ExecStart: StateDirectory= and LoadCredential= (a 0400 copy of the token)
        state, credentials = tmp_path / "var-lib", tmp_path / "credentials"
        (state / "slmops-agent").mkdir(parents=True)
        credentials.mkdir(mode=0o700)
        shutil.copy(root / "etc/slmops/agent-enroll-token", credentials / "enroll-token")
        (credentials / "enroll-token").chmod(0o400)
        unit = (root / "etc/systemd/system/slmops-agent.service").read_text()
        env = _environment_file(env_path)
        argv = _exec_start(unit, env, state, credentials)
        process_env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        process_env["SLMOPS_HOME"] = str(state / "slmops-agent")  # Environment=SLMOPS_HOME=%S/slmops-agent

        # Execute
        done = subprocess.run(argv, env=process_env, capture_output=True, text=True, timeout=120, check=False)

        # Assert: the agent ran from the unit's command line, enrolled with its labels, and kept its state in %S.
        assert done.returncode == 0, done.stderr
        assert argv[:2] == [EXE, "agent"] and "--once" in argv and enroll not in argv
        devices = httpx.get(f"{url}/api/v1/devices", headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()
        assert [d["labels"] for d in devices] == [{"site": "unit"}]
        status = subprocess.run(
            [EXE, "agent", "status", "--data-dir", str(state / "slmops-agent"), "--json"],
            env=process_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(status.stdout)["device_id"] == devices[0]["id"]
