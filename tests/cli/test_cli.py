from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.cli import run
from tests.tiny_gguf import write_tiny_gguf


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    capsys.readouterr()
    assert run(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_model_commands_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")

    imported = _json(capsys, ["model", "import", str(model), "--name", "tiny", "--json"])
    assert isinstance(imported, dict) and imported["created"] is True and imported["version"] == "v1"
    again = _json(capsys, ["model", "import", str(model), "--name", "tiny", "--json"])
    assert isinstance(again, dict) and again["created"] is False

    assert run(["model", "tag", "tiny@v1", "stable"]) == 0
    models = _json(capsys, ["model", "list", "--json"])
    assert isinstance(models, list) and models[0]["aliases"] == {"latest": "v1", "stable": "v1"}
    versions = _json(capsys, ["model", "list", "tiny", "--json"])
    assert isinstance(versions, list) and versions[0]["aliases"] == ["latest", "stable"]
    shown = _json(capsys, ["model", "show", "tiny@stable", "--json"])
    assert isinstance(shown, dict) and shown["manifest"]["facts"]["architecture"] == "llama"
    verified = _json(capsys, ["model", "verify", "tiny", "--json"])
    assert isinstance(verified, dict) and verified["ok"] is True
    tree = _json(capsys, ["model", "lineage", "tiny", "--json"])
    assert isinstance(tree, list) and tree[0]["version"] == "v1"

    bundle = tmp_path / "b.tar"
    assert run(["model", "export", "tiny", "-o", str(bundle)]) == 0
    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path / "site"))
    imported_bundle = _json(capsys, ["model", "import-bundle", str(bundle), "--trust", "--json"])
    assert isinstance(imported_bundle, dict) and len(imported_bundle["added"]) == 1
    assert run(["model", "verify", "tiny@stable"]) == 0

    assert run(["model", "rm", "tiny@v1"]) == 0
    gc = _json(capsys, ["model", "gc", "--grace-s", "0", "--json"])
    assert isinstance(gc, dict) and len(gc["removed"]) == 1

    for argv in (["model", "list"], ["model", "show", "tiny"], ["keys", "list"]):
        assert run(argv) in (0, 3)


def test_human_output_has_tables_and_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(["model", "import", str(write_tiny_gguf(tmp_path / "tiny.gguf")), "--name", "tiny"])
    capsys.readouterr()

    assert run(["model", "list", "tiny"]) == 0
    assert run(["model", "show", "tiny"]) == 0
    assert run(["model", "lineage", "tiny"]) == 0
    out = capsys.readouterr().out

    assert "v1" in out and "llama" in out and "tiny.gguf" in out and "tiny@v1" in out


def test_user_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["model", "show", "nope"]) == 3
    err = capsys.readouterr().err
    assert "error:" in err and "no model named 'nope'" in err and "Traceback" not in err

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    assert run(["model", "import", str(bad), "--name", "bad"]) == 5
    assert "Traceback" not in capsys.readouterr().err


def test_a_verify_failure_exits_non_zero_and_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slmops.registry import Registry

    run(["model", "import", str(write_tiny_gguf(tmp_path / "tiny.gguf")), "--name", "tiny"])
    registry = Registry.open()
    blob = registry.blob_path(registry.resolve("tiny").manifest.files[0].digest)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"GGUF")
    capsys.readouterr()

    assert run(["model", "verify", "tiny"]) == 6
    err = capsys.readouterr().err
    assert "tiny.gguf: expected sha256:" in err and "got sha256:" in err


_BLOCK_HEAVY = """
import sys
BLOCKED = {"torch", "transformers", "llama_cpp", "gguf", "numpy", "safetensors", "peft", "fastapi", "uvicorn",
           "boto3", "psycopg", "onnx", "scipy"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked heavy import: {name}")
        return None
sys.meta_path.insert(0, Blocker())
import slmops
from slmops.cli import run
code = run(sys.argv[1:])
assert not (BLOCKED & set(m.split(".")[0] for m in sys.modules)), sorted(BLOCKED & set(sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["model", "--help"], ["model", "list"], ["--version"]])
def test_the_cli_works_with_only_the_core_dependencies(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _BLOCK_HEAVY, *argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_gguf_import_works_with_only_the_core_dependencies(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_HEAVY, "model", "import", str(model), "--name", "tiny"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "registered tiny@v1" in result.stdout


def test_the_installed_entry_point_prints_help() -> None:
    exe = Path(sys.executable).with_name("slmops")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "model" in result.stdout and "keys" in result.stdout
