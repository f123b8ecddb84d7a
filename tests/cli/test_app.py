"""The root command: shell completion, usage errors, and how the command modules depend on each other."""

from __future__ import annotations

import ast
import graphlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import slmops.cli
from slmops.cli import run

EXE = Path(sys.executable).with_name("slmops")
CLI_DIR = Path(slmops.cli.__file__).parent
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def _in_bash(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a real bash (so typer detects the shell as a user's terminal would)."""
    assert BASH is not None
    env = {**os.environ, "HOME": str(home), "SHELL": BASH}
    return subprocess.run([BASH, "-c", script], capture_output=True, text=True, env=env, check=False, timeout=120)


@needs_bash
def test_show_completion_prints_a_bash_script_that_completes_commands(tmp_path: Path) -> None:
    exe = shlex.quote(str(EXE))

    shown = _in_bash(f"{exe} --show-completion bash; true", tmp_path)
    completed = _in_bash(
        f"source <({exe} --show-completion bash)\n"
        f'COMP_WORDS=(slmops rol); COMP_CWORD=1; _slmops_completion {exe}; echo "top: ${{COMPREPLY[*]}}"\n'
        f'COMP_WORDS=(slmops rollout pa); COMP_CWORD=2; _slmops_completion {exe}; echo "sub: ${{COMPREPLY[*]}}"\n',
        tmp_path,
    )

    assert shown.returncode == 0, shown.stderr
    assert "_SLMOPS_COMPLETE=complete_bash" in shown.stdout
    assert "complete -o default -F _slmops_completion slmops" in shown.stdout
    assert completed.returncode == 0, completed.stderr
    assert "top: rollout" in completed.stdout
    assert "sub: pause" in completed.stdout


@needs_bash
def test_install_completion_adds_the_script_to_bashrc(tmp_path: Path) -> None:
    installed = _in_bash(f"{shlex.quote(str(EXE))} --install-completion; true", tmp_path)

    assert installed.returncode == 0, installed.stderr
    assert "bash completion installed in" in installed.stdout
    scripts = list(tmp_path.rglob("slmops.sh"))
    assert len(scripts) == 1 and "_slmops_completion" in scripts[0].read_text()
    assert str(scripts[0].relative_to(tmp_path)) in (tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nosuch"], "No such command 'nosuch'"),
        (["device", "show"], "Missing argument 'device_id'"),
        (["rollout", "start", "tills"], "Missing option '--to'"),
        (["model", "list", "--no-such-flag"], "No such option: --no-such-flag"),
    ],
)
def test_a_usage_error_prints_usage_and_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(argv)

    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "--help" in err
    assert "internal error" not in err


_WITHOUT_CLICK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "click":
            raise ImportError("click is not installed")
        return None
sys.meta_path.insert(0, Blocker())
from slmops.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.parametrize(("argv", "expected"), [(["--help"], 0), (["nosuch"], 2)])
def test_the_cli_needs_no_click_besides_the_one_in_typer(argv: list[str], expected: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CLICK, *argv], capture_output=True, text=True, check=False, timeout=120
    )

    assert result.returncode == expected, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def _cli_imports(path: Path) -> set[str]:
    """The ``slmops.cli`` modules that a module imports, anywhere in it (top level or inside a function)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "slmops.cli":
            found.update(f"slmops.cli.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slmops.cli."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("slmops.cli."))
    return found


def test_command_modules_import_no_cycle_and_only_the_root_registers_them() -> None:
    modules = {f"slmops.cli.{p.stem}": p for p in CLI_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {name: _cli_imports(path) for name, path in modules.items()}

    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle

    assert set(modules) <= set(order)
    shared = {"slmops.cli._common", "slmops.cli._remote"}
    # a private module `_<command>_<part>.py` is a piece of one command: only that command imports it
    pieces = {name for name in modules if name.rsplit(".", 1)[1].startswith("_") and name not in shared}
    owner = {name: "slmops.cli." + name.rsplit(".", 1)[1][1:].split("_")[0] for name in pieces}
    allowed = {name: shared | {p for p in pieces if owner[p] == name} for name in modules}
    assert {name: deps - allowed[name] for name, deps in graph.items() if deps - allowed[name]} == {}
    assert set(modules) - shared - pieces <= _cli_imports(CLI_DIR / "__init__.py")
