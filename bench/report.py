"""Results as rows, rendered as a terminal table, a markdown table and JSON lines.

A row is one workload: our result, each peer's result, and the target from the
issue. The ratio is always ours over the best peer measured in the same run,
because the machine is shared and absolute numbers drift between runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import Target, Unit, format_ratio, median, ratio, spread, verdict_text

OURS = "occlumfs"


@dataclass
class Result:
    """One subject's samples on one workload, or why there are none."""

    subject: str
    samples: list[float] = field(default_factory=list)
    error: str | None = None  # "unavailable: ..." or "failed: ..."

    @property
    def value(self) -> float | None:
        return median(self.samples) if self.samples and self.error is None else None

    def cell(self, unit: Unit) -> str:
        if self.error is not None:
            return self.error.split(":", 1)[0]  # "unavailable" / "failed"; details in notes
        if not self.samples:
            return "—"
        return unit.format(self.value)

    def to_json(self) -> dict:
        return {
            "subject": self.subject,
            "samples": self.samples,
            "median": self.value,
            "spread": spread(self.samples) if self.samples else None,
            "error": self.error,
        }


@dataclass
class Row:
    key: str  # stable id for the results log, e.g. "image.build.stdlib"
    workload: str  # what a reader sees
    unit: Unit
    ours: Result
    peers: list[Result] = field(default_factory=list)
    target: Target | None = None
    notes: list[str] = field(default_factory=list)

    def best_peer(self) -> Result | None:
        best = None
        for peer in self.peers:
            if peer.value is None:
                continue
            if best is None or self.unit.better(peer.value, best.value):
                best = peer
        return best

    def compared_peer(self) -> Result | None:
        """The peer the ratio is taken against: the target's named one, else the best."""
        if self.target is not None and self.target.versus is not None:
            for peer in self.peers:
                if peer.subject == self.target.versus:
                    return peer if peer.value is not None else None
            return None
        return self.best_peer()

    def ratio(self) -> float | None:
        peer = self.compared_peer()
        return ratio(self.ours.value, peer.value if peer else None)

    def ratio_cell(self) -> str:
        if not self.peers:
            return "—"
        text = format_ratio(self.ratio())
        versus = self.target.versus if self.target is not None else None
        return f"{text} {versus}" if versus and text != "—" else text

    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(self.ratio(), self.ours.value)

    def all_notes(self) -> list[str]:
        """The row's notes, plus the ratio to the best peer when the target names another."""
        best, named = self.best_peer(), self.compared_peer()
        if best is None or named is None or best is named:
            return self.notes
        r = format_ratio(ratio(self.ours.value, best.value))
        return [*self.notes, f"against the best peer ({best.subject}, not judged): {r}"]

    def ours_failed(self) -> bool:
        return self.ours.error is not None or self.ours.value is None

    def to_json(self) -> dict:
        best = self.compared_peer()
        r = self.ratio()
        return {
            "key": self.key,
            "workload": self.workload,
            "unit": self.unit.symbol,
            "higher_is_better": self.unit.higher_is_better,
            "ours": self.ours.to_json(),
            "peers": [p.to_json() for p in self.peers],
            "best_peer": best.subject if best else None,
            "ratio": None if r is None or math.isinf(r) else r,
            "target": self.target.describe() if self.target else None,
            "met": self.met(),
            "notes": self.notes,
        }


@dataclass
class SuiteReport:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""  # a suite without a table (the crash soak) says its result here
    failed: str = ""  # why our side of a table-less suite failed, if it did

    def ours_failed(self) -> bool:
        return bool(self.failed) or any(row.ours_failed() for row in self.rows)

    def peer_columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            for peer in row.peers:
                if peer.subject not in names:
                    names.append(peer.subject)
        return names

    def ours_label(self) -> str:
        labels = {row.ours.subject for row in self.rows}
        return labels.pop() if len(labels) == 1 else OURS

    def grid(self) -> list[list[str]]:
        """Header plus one line per row, as strings, in display order."""
        peers = self.peer_columns()
        header = ["workload", self.ours_label(), *peers, "ratio to best", "target", "verdict"]
        lines = [header]
        for row in self.rows:
            by_name = {p.subject: p for p in row.peers}
            cells = [row.workload, row.ours.cell(row.unit)]
            cells += [by_name[name].cell(row.unit) if name in by_name else "" for name in peers]
            cells += [
                row.ratio_cell(),
                row.target.describe() if row.target else "",
                verdict_text(row.met()) if row.target else "",
            ]
            lines.append(cells)
        return lines

    def verdict_line(self) -> str:
        judged = [row for row in self.rows if row.target is not None]
        met = [row for row in judged if row.met() is True]
        missed = [row.workload for row in judged if row.met() is False]
        open_ = [row.workload for row in judged if row.met() is None]
        line = f"targets met: {len(met)} of {len(judged)}"
        if missed:
            line += "; missed: " + "; ".join(missed)
        if open_:
            line += "; not judged (a side is missing): " + "; ".join(open_)
        return line

    def failure_notes(self) -> list[str]:
        out = []
        for row in self.rows:
            for result in (row.ours, *row.peers):
                if result.error:
                    out.append(f"{row.workload} — {result.subject}: {result.error}")
        return out

    def row_notes(self) -> list[str]:
        return [f"{row.workload}: {note}" for row in self.rows for note in row.all_notes()]


def _untabled(report: SuiteReport, bullet: str) -> list[str]:
    lines = [report.summary] if report.summary else []
    if report.failed:
        lines.append(f"FAILED: {report.failed}")
    return lines + [f"{bullet}{note}" for note in report.notes]


def render_text(report: SuiteReport) -> str:
    if not report.rows:
        return "\n".join([report.title, *_untabled(report, "  * ")])
    grid = report.grid()
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]

    def fmt(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [report.title, fmt(grid[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in grid[1:]]
    out.append(report.verdict_line())
    for note in report.failure_notes() + report.row_notes() + report.notes:
        out.append(f"  * {note}")
    return "\n".join(out)


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(report: SuiteReport) -> str:
    if not report.rows:
        return "\n".join([f"#### {report.title}", "", *_untabled(report, "- ")])
    grid = report.grid()
    out = [f"#### {report.title}", ""]
    out.append("| " + " | ".join(_md_escape(c) for c in grid[0]) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(grid[0]) - 1)) + "|")
    for line in grid[1:]:
        out.append("| " + " | ".join(_md_escape(c) for c in line) + " |")
    verdict = report.verdict_line()
    out += ["", f"**{verdict[0].upper()}{verdict[1:]}.**"]
    notes = report.failure_notes() + report.row_notes() + report.notes
    if notes:
        out.append("")
        out += [f"- {note}" for note in notes]
    return "\n".join(out)


def append_json_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
