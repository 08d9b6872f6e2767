"""How ``qops top`` draws a snapshot of ``qops.monitor.ClusterState``: as plain text
(no terminal: cron, logs, tests) or as rich tables (the live view), sorted and
filtered as the keys chose. rich is imported only to draw."""

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
        cells = [columns, *rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in cells]
    return "\n".join(lines)


def rich_view(snap: dict[str, Any], view: View) -> Any:
    """The live view: the headline, the sections as rich tables, the keys."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(headline(snap), style="bold")]
    for title, columns, rows in tables(snap):
        table = Table(title=title, title_justify="left", show_edge=False,
                      header_style="bold", expand=False)
        for col in columns:
            table.add_column(col, overflow="fold" if col == "exception" else "ellipsis")
        for row in rows[:30]:
            style = "red" if title == "nodes" and row[1] == "gone" else None
            # Text: names and exceptions are shown as they are, never read as markup
            # ("[/path]" in an exception would end the view with a MarkupError)
            table.add_row(*(Text(cell) for cell in row), style=style)
        parts.append(table)
    filt = f"filter: {view.filter}{'_' if view.typing else ''}" if (view.filter or view.typing) \
        else "f: filter"
    parts.append(Text(f"sort: {SORTS[view.sort][0]} (s)  {filt}  q: quit", style="dim"))
    return Group(*parts)


def _rate(value: float | None) -> str:
    """A rate the events may not give (Celery's workers don't name the queue)."""
    return "-" if value is None else f"{value:.1f}"


def _clock(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%H:%M:%S")
