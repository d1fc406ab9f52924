"""A probe's files as the page reads them, and the generic section of a probe the report has no section for."""

from __future__ import annotations

from ...core.runs import RunDir
from ...probes.base import ProbeResult
from ..html import Section, Table


def _probe(run: RunDir, probe: str, command: str, title: str) -> tuple[Section, dict | None, dict | None]:
    sec = Section(title)
    d = run.path / "probes" / probe
    if not (d / "summary.json").exists():
        sec.missing = f"not run: `memloc {command} {run.path}`"
        return sec, None, None
    result = ProbeResult.load(run, probe)
    return sec, result.summary, result.arrays


def probe_section(run: RunDir, probe) -> Section:
    """A probe without a section of its own: its headline numbers and its tidy rows, from its files."""
    sec, summary, _ = _probe(run, probe.name, probe.command, probe.help[:1].upper() + probe.help[1:])
    if summary is None:
        return sec
    result = ProbeResult.load(run, probe.name)
    headline = [{"measure": k, "value": v} for k, v in summary.items() if isinstance(v, (int, float, str, bool))
                and k not in ("run",)]
    if headline:
        sec.tables.append(Table(f"summary_{probe.name}", "Summary", headline))
    if result.rows:
        sec.tables.append(Table(probe.name, f"{probe.name}.csv", result.rows))
    return sec


def _load_probe(run: RunDir | None, probe: str) -> tuple[dict | None, dict | None]:
    if run is None or not (run.path / "probes" / probe / "summary.json").exists():
        return None, None
    result = ProbeResult.load(run, probe)
    return result.summary, result.arrays
