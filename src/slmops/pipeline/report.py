"""The pipeline's report for CI systems: JUnit XML (one testcase per class × gate and per matrix run) and Markdown.

JUnit: one ``<testsuite>`` per device class, each with a testcase ``<variant>: <gate>`` per gate (``<failure>`` when
it failed, ``<skipped>`` when it was skipped) and ``matrix <variant>`` per test-matrix run; GitHub, GitLab and Jenkins
render these. The Markdown summary is written for ``$GITHUB_STEP_SUMMARY`` (GitLab shows it as an artifact).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from slmops.pipeline.run import PipelineReport

__all__ = ["junit_xml", "markdown_summary", "write_text_atomic"]


def junit_xml(report: PipelineReport) -> str:
    root = ET.Element("testsuites", name=f"slmops pipeline {report.name}")
    classes = list(dict.fromkeys([d.device_class for d in report.decisions] + [g.device_class for g in report.gates]))
    total_tests = total_failures = total_skipped = 0
    for cls in classes:
        suite = ET.SubElement(root, "testsuite", name=f"{report.name}.{cls}")
        tests = failures = skipped = 0
        for g in (g for g in report.gates if g.device_class == cls):
            case = ET.SubElement(suite, "testcase", classname=f"{report.name}.{cls}", name=f"{g.variant}: {g.name}")
            tests += 1
            if g.status == "fail":
                failures += 1
                ET.SubElement(case, "failure", message=g.reason, type="gate").text = f"limit: {g.limit}\n{g.reason}"
            elif g.status == "skipped":
                skipped += 1
                ET.SubElement(case, "skipped", message=g.reason)
            else:
                ET.SubElement(case, "system-out").text = g.reason
        for run in (r for r in report.matrix if r.device_class == cls):
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{report.name}.{cls}",
                name=f"matrix {run.variant}",
                time=f"{run.seconds:.3f}",
            )
            tests += 1
            if not run.ok:
                failures += 1
                ET.SubElement(
                    case, "failure", message=run.reason, type="matrix"
                ).text = f"reached: {run.reached}\nlimits: {run.limits}\n{run.reason}"
            else:
                ET.SubElement(case, "system-out").text = f"{run.reason}\nlimits: {run.limits}"
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", str(skipped))
        total_tests, total_failures, total_skipped = (
            tests + total_tests,
            failures + total_failures,
            skipped + total_skipped,
        )
    root.set("tests", str(total_tests))
    root.set("failures", str(total_failures))
    root.set("errors", "0")
    root.set("skipped", str(total_skipped))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(report: PipelineReport) -> str:
    icon = {"released": "✅", "registered": "✅", "partial": "⚠️", "gates_failed": "❌"}.get(report.outcome, "•")
    lines = [f"## slmops pipeline `{report.name}`: {icon} {report.outcome}", ""]
    if report.source:
        lines.append(f"source `{report.source.get('version')}`, baseline `{report.baseline.get('version', '-')}`")
    if report.measured_on:
        lines.append(f"measured on {report.measured_on}" + (" (cached report)" if report.cached else ""))
    lines += ["", "| class | variant | released | why |", "|---|---|---|---|"]
    for d in report.decisions:
        lines.append(
            f"| {_cell(d.device_class)} | {_cell(d.variant or '-')} | {'yes' if d.released else 'no'} "
            f"| {_cell(d.reason)} |"
        )
    lines += ["", "### gates", "", "| class | variant | gate | status | detail |", "|---|---|---|---|---|"]
    for g in report.gates:
        mark = {"pass": "✅ pass", "fail": "❌ fail"}.get(g.status, "➖ skipped")
        lines.append(f"| {_cell(g.device_class)} | {_cell(g.variant)} | {g.name} | {mark} | {_cell(g.reason)} |")
    if report.matrix:
        lines += [
            "",
            "### test matrix (real agents under each class's limits)",
            "",
            "| class | variant | ok | tokens/s | peak memory | limits | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report.matrix:
            speed = f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-"
            peak = f"{r.peak_memory_bytes / (1 << 20):.0f} MiB" if r.peak_memory_bytes else "-"
            limits = "; ".join(f"{k}: {v}" for k, v in r.limits.items() if k != "notes")
            lines.append(
                f"| {_cell(r.device_class)} | {_cell(r.variant)} | {'yes' if r.ok else 'no'} | {speed} | {peak} "
                f"| {_cell(limits)} | {_cell(r.reason)} |"
            )
    for release in report.releases:
        lines.append("")
        lines.append(
            f"release `{release['release_id']}` of blueprint `{release['blueprint']}` ({release['state']}) for "
            f"classes {', '.join(release['classes'])}"
        )
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a report file whole (temp file + rename); appends are left to the caller (GITHUB_STEP_SUMMARY)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
