"""How ``qops top`` draws a snapshot of ``qops.monitor.ClusterState``: as plain text
(no terminal: cron, logs, tests) or as styled, aligned columns (the live view), sorted
and filtered as the keys chose. rich is imported only to draw."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

#: node sort orders, cycled by the ``s`` key: (label, key, descending)
SORTS: tuple[tuple[str, str, bool], ...] = (
    ("name", "name", False), ("active", "active", True), ("rate", "rate", True),
    ("processed", "processed", True), ("failed", "failed", True))


@dataclass
class View:
    """What the keys changed: the sort order and a filter (a substring of node, queue
    or task names)."""

    sort: int = 0
    filter: str = ""
    typing: bool = False  # the filter is being typed

    def key(self, ch: str) -> bool:
        """Apply one key; False when it asks to quit."""
        if self.typing:
            if ch in ("\r", "\n"):
                self.typing = False
            elif ch == "\x1b":
                self.typing, self.filter = False, ""
            elif ch in ("\x7f", "\b"):
                self.filter = self.filter[:-1]
            elif ch.isprintable():
                self.filter += ch
            return True
        if ch in ("q", "Q", "\x03"):
            return False
        if ch == "s":
            self.sort = (self.sort + 1) % len(SORTS)
        elif ch in ("f", "/"):
            self.typing, self.filter = True, ""
        elif ch == "\x1b":
            self.filter = ""
        return True


def select(snap: dict[str, Any], sort: str = "name", text: str = "") -> dict[str, Any]:
    """``snap`` with its nodes sorted by ``sort`` and every list filtered by ``text``."""
    label = next((s for s in SORTS if s[0] == sort), SORTS[0])
    out = dict(snap)
    out["nodes"] = sorted(snap["nodes"], key=lambda n: (n[label[1]], n["name"]),
                          reverse=label[2])
    if text:
        low = text.lower()

        def hit(*values: Any) -> bool:
            return any(low in str(v).lower() for v in values)

        out["nodes"] = [n for n in out["nodes"] if hit(n["name"])]
        out["queues"] = [q for q in snap["queues"] if hit(q["name"])]
        out["tasks"] = {k: v for k, v in snap["tasks"].items() if hit(k)}
        out["running"] = [r for r in snap["running"] if hit(r["name"], r["hostname"])]
        out["failures"] = [f for f in snap["failures"] if hit(f["name"], f["hostname"])]
    return out


def tables(snap: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of each section."""
    nodes = [[n["name"], "up" if n["up"] else "gone", n["sw"] or "-",
              " ".join(f"{x:.2f}" for x in n["loadavg"]) or "-", f"{n['rate']:.1f}",
              str(n["active"]), str(n["processed"]), str(n["failed"])]
             for n in snap["nodes"]]
    queues = [[q["name"], str(q["ready"]), "?" if q["in_flight"] is None else str(q["in_flight"]),
               str(q["consumers"]), _rate(q.get("in_rate")), _rate(q.get("out_rate")),
               f"{q['rate']:+.1f}"] for q in snap["queues"]]
    states = ("received", "started", "succeeded", "failed", "retried", "revoked", "rejected",
              "dead_lettered")
    tasks = [[name, *(str(counts.get(s, 0)) for s in states)]
             for name, counts in sorted(snap["tasks"].items())]
    running = [[r["name"], r["uuid"], r["hostname"], f"{r['runtime']:.1f}s"]
               for r in snap["running"]]
    failures = [[_clock(f["time"]), f["name"], f["hostname"], f["exception"]]
                for f in snap["failures"]]
    return [
        ("nodes", ["node", "state", "software", "load", "tasks/s", "active", "processed",
                   "failed"], nodes),
        ("queues", ["queue", "ready", "in flight", "consumers", "in/s", "out/s", "growth/s"],
         queues),
        ("tasks", ["task", *(s.replace("_", " ") for s in states)], tasks),
        ("running", ["task", "id", "node", "runtime"], running),
        ("failures", ["time", "task", "node", "exception"], failures),
    ]


def headline(snap: dict[str, Any]) -> str:
    broker = "up" if snap["broker_up"] else "UNREACHABLE"
    dead = "?" if snap["dead_letters"] is None else snap["dead_letters"]
    gone = sum(1 for n in snap["nodes"] if not n["up"])
    return (f"qops top  broker {broker}  workers {snap['workers_online']} up, {gone} gone"
            f"  running {len(snap['running'])}  dead letters {dead}")


def plain(snap: dict[str, Any]) -> str:
    """The snapshot as aligned plain text."""
    lines = [headline(snap)]
    for title, columns, rows in tables(snap):
        lines.append("")
        lines.append(f"{title}:")
        if not rows:
            lines.append("  (none)")
            continue
        widths = _widths(columns, rows)
        lines += ["  " + _aligned(r, widths, "  ") for r in [columns, *rows]]
    return "\n".join(lines)


def _widths(columns: list[str], rows: list[list[str]]) -> list[int]:
    return [max(len(r[i]) for r in (columns, *rows)) for i in range(len(columns))]


def _aligned(cells: list[str], widths: list[int], sep: str) -> str:
    return sep.join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


#: rows drawn per section of the live view (the screen crops what does not fit)
MAX_ROWS = 30


def rich_view(snap: dict[str, Any], view: View) -> Any:
    """The live view: the headline, the sections as aligned columns, the keys. One rich
    Text with the columns padded here: rich's Table cost ~12 ms a frame (most of
    ``qops top``'s CPU beside following the events), this ~1 ms. Cells are appended as
    plain text, never read as markup ("[/path]" in an exception would be a tag)."""
    from rich.text import Text

    out = Text(no_wrap=True, overflow="crop")
    out.append(headline(snap), style="bold")
    for title, columns, all_rows in tables(snap):
        rows = all_rows[:MAX_ROWS]
        widths = _widths(columns, rows)
        out.append("\n\n")
        out.append(title, style="bold italic")
        out.append("\n")
        out.append(_aligned(columns, widths, " │ "), style="bold")
        out.append("\n" + "─┼─".join("─" * w for w in widths))
        for row in rows:
            out.append("\n")
            out.append(_aligned(row, widths, " │ "),
                       style="red" if title == "nodes" and row[1] == "gone" else "")
    filt = f"filter: {view.filter}{'_' if view.typing else ''}" if (view.filter or view.typing) \
        else "f: filter"
    out.append(f"\n\nsort: {SORTS[view.sort][0]} (s)  {filt}  q: quit", style="dim")
    return out


def _rate(value: float | None) -> str:
    """A rate the events may not give (Celery's workers don't name the queue)."""
    return "-" if value is None else f"{value:.1f}"


def _clock(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%H:%M:%S")
