"""CI/CD for models: a pipeline file, run as build → evaluate → gate per class → test matrix → register → release.

- :mod:`slmops.pipeline.spec`: the pipeline file (strict YAML);
- :mod:`slmops.pipeline.limits`: a device class's limits enforced by the OS (cgroups, taskset, tmpfs, prlimit);
- :mod:`slmops.pipeline.matrix`: real ``slmops agent`` processes per (variant, class) on a private control plane;
- :mod:`slmops.pipeline.gates`: the pure per-class gates;
- :mod:`slmops.pipeline.run`: the resumable, cached run; :mod:`slmops.pipeline.report`: JUnit XML and Markdown.
"""

from __future__ import annotations

from slmops.pipeline.gates import ClassGate, matrix_gates, offline_gates
from slmops.pipeline.limits import Confinement, Enforcement, detect
from slmops.pipeline.matrix import MatrixJob, MatrixRun, run_matrix
from slmops.pipeline.report import junit_xml, markdown_summary
from slmops.pipeline.run import ClassDecision, PipelineReport, plan_pipeline, run_pipeline
from slmops.pipeline.spec import PipelineSpec, load_pipeline, parse_pipeline

__all__ = [
    "ClassDecision",
    "ClassGate",
    "Confinement",
    "Enforcement",
    "MatrixJob",
    "MatrixRun",
    "PipelineReport",
    "PipelineSpec",
    "detect",
    "junit_xml",
    "load_pipeline",
    "markdown_summary",
    "matrix_gates",
    "offline_gates",
    "parse_pipeline",
    "plan_pipeline",
    "run_matrix",
    "run_pipeline",
]
