"""The Containerfiles stay in step with the project: the Makefile's llama.cpp flags, pyproject's llama-cpp-python pin,
two stages, an unprivileged final user, and only the context files that build-images.sh puts there.

Building the images takes minutes and a base image (see packaging/README.md); this checks what can drift."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.packaging._env import LLAMA_CMAKE_ARGS, REPO

PACKAGING = REPO / "packaging"


def _makefile_cmake_args() -> str:
    found = re.search(r"^LLAMA_CMAKE_ARGS \?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert found is not None
    return found.group(1).strip()


def _llama_pin() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {r for extra in ("llama", "agent") for r in project["optional-dependencies"][extra] if "llama-cpp" in r}
    assert len(pins) == 1, pins  # the agent and llama extras pin the same llama-cpp-python
    return pins.pop().split("==")[1]


@pytest.mark.parametrize("role", ["agent", "server"])
def test_a_containerfile_builds_llama_like_the_makefile_and_runs_unprivileged(role: str) -> None:
    text = (PACKAGING / f"Containerfile.{role}").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)

    assert f'ARG CMAKE_ARGS="{_makefile_cmake_args()}"' in text
    assert f"ARG LLAMA_CPP_PYTHON={_llama_pin()}" in text
    assert len(stages) == 2 and stages[0][1] == "build" and stages[1][1] == ""
    assert "COPY --from=build /opt/slmops /opt/slmops" in text
    assert users and users[-1] != "root" and not users[-1].startswith("0")
    assert "--mount=type=cache" in text
    assert re.search(r"^ENTRYPOINT \[\"/opt/slmops/bin/slmops\", \"" + role + '"', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert source.startswith("dist/"), source  # build-images.sh fills packaging/dist/


def test_the_tests_build_llama_like_the_makefile() -> None:
    assert LLAMA_CMAKE_ARGS in ("", _makefile_cmake_args())
