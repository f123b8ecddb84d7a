"""Optimization recipes, passes and evaluation.

Heavy dependencies (llama-cpp-python, gguf, numpy, matplotlib, torch) are imported inside the functions that use
them, so importing this package costs nothing. Public entry points:

- :mod:`slmops.optimize.passes` — the pass interface and registry (``Pass``, ``PassResult``, ``register_pass``);
- :mod:`slmops.optimize.gguf_passes` — ``dequantize`` and ``quantize`` through llama.cpp;
- :mod:`slmops.optimize.recipe` — YAML recipes (``load_recipe``);
- :mod:`slmops.optimize.runner` — ``run_recipe``: run, cache, evaluate and register;
- :mod:`slmops.optimize.evaluate` — perplexity, task accuracy, memory and speed;
- :mod:`slmops.optimize.report` — the variant table and the Pareto plot.
"""

from __future__ import annotations

__all__: list[str] = []
