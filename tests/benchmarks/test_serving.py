"""The serving benchmark's quick mode end to end on a tiny generated GGUF: in-process children, a real control plane
with a real enrolled agent, `slmops serve` and `llama_cpp.server`, all over loopback HTTP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from benchmarks.serving import main

from tests.tiny_gguf import write_tiny_gguf


def test_the_quick_mode_measures_every_system_and_writes_its_section(tmp_path: Path) -> None:
    # Prepare: a tiny model, an existing BENCHMARKS.md with another benchmark's section.
    model = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    argv = ["--model", str(model), "--quick", "--max-tokens", "8", "--concurrency", "2", "--context", "256"]

    # Execute
    result = main([*argv, "--output", str(output), "--json", str(tmp_path / "serving.json")])

    # Assert: three in-process candidates (one per wait policy), the best of them is the reference.
    candidates = result["candidates"]
    policies = [c["config"].split()[1] for c in candidates]
    assert policies == ["OMP_WAIT_POLICY=active", "OMP_WAIT_POLICY=passive", "OMP_WAIT_POLICY=bounded"]
    assert result["reference"] in candidates
    systems = {s["name"]: s for s in result["systems"]}
    served = ["agent (local API)", "slmops serve"]
    if importlib.util.find_spec("sse_starlette") is not None:
        served.append("llama_cpp.server")
    else:
        assert systems["llama_cpp.server"]["skipped"].startswith("not installed")
    for name in served:
        system = systems[name]
        assert system["skipped"] is None, system
        assert len(system["nonstream_tps"]) == len(system["stream_tps"]) == len(system["concurrent_tps"]) == 1
        assert all(v > 0 for v in system["nonstream_tps"] + system["stream_tps"] + system["concurrent_tps"])
        assert 0 < system["ttft_s"][0] < 60
        assert 0 < sum(system["tokens"]) <= 8 * 2  # two prompts, max_tokens 8 each
        assert name in result["ratios"] and result["ratios"][name]["nonstream_tps"] > 0
    assert systems["second runtime (onnx-genai)"]["skipped"] == "not given (--second-runtime PATH)"

    # Assert: the section is written between its markers with the command, and the other section is kept.
    text = output.read_text()
    assert "<!-- other:begin -->\nkept\n<!-- other:end -->" in text
    section = text[text.index("<!-- serving:begin -->") : text.index("<!-- serving:end -->")]
    assert f"`python -m benchmarks.serving --model {model} --max-tokens 8" in section
    for name in ["in-process", *served]:
        assert f"| {name} |" in section
    assert "load before → after" in section and "Goal (agent ≥ 95%" in section
    assert json.loads((tmp_path / "serving.json").read_text())["ratios"] == result["ratios"]
