"""Child process that loads one GGUF model and measures it; prints one JSON line.

Run as ``python -m slmops.optimize._probe SPEC.json`` by :func:`slmops.optimize.evaluate.measure`; a fresh process
so that its peak RSS (``VmHWM``) is this model's alone.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    """This process image's RSS high-water mark. ``VmHWM`` resets at exec; ``ru_maxrss`` would also count the
    parent's memory inherited through fork, so it is only the fallback where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(spec_path: str) -> int:
    import numpy as np

    from slmops.optimize._llama import LlamaSession

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    prompt: list[int] = spec["prompt"]
    batch = 64
    started = time.perf_counter()
    with LlamaSession(
        Path(spec["model"]), n_ctx=spec["context_tokens"], n_threads=spec["threads"], max_outputs=batch
    ) as s:
        load_s = time.perf_counter() - started
        peak_load = _peak_rss_bytes()
        if s.add_bos and s.bos is not None:
            prompt = [s.bos, *prompt]
        t0 = time.perf_counter()
        logits = None
        for start in range(0, len(prompt), batch):
            part = prompt[start : start + batch]
            logits = s.decode(part, start, [False] * (len(part) - 1) + [start + batch >= len(prompt)])
        prefill_s = time.perf_counter() - t0
        assert logits is not None
        position = len(prompt)
        token = int(np.argmax(logits[-1]))
        t0 = time.perf_counter()
        for _ in range(spec["decode_tokens"]):
            logits = s.decode([token], position, [True])
            assert logits is not None
            token = int(np.argmax(logits[0]))
            position += 1
        decode_s = time.perf_counter() - t0
    result = {
        "load_s": load_s,
        "peak_rss_load_bytes": peak_load,
        "peak_rss_bytes": _peak_rss_bytes(),
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": spec["decode_tokens"] / decode_s,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
