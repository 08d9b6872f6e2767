"""What the CLI draws with rich shows names, arguments and exceptions as they are: a
"[/x]" in one is text, not a markup tag (rich raised MarkupError on it and ended the
command)."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from qops.cli import top_view
from qops.cli.terminal import Terminal

TRICKY = "OSError: cannot open [/var/run/x] [bold]"


def test_top_live_view_shows_markup_like_text() -> None:
    snap = {"broker_up": True, "workers_online": 1, "dead_letters": 0, "queue_out": {},
            "nodes": [{"name": "w[/1]@h", "up": True, "last_seen": 0.1, "active": 0,
                       "processed": 1, "succeeded": 0, "failed": 1, "rate": 0.0,
                       "loadavg": [], "sw": "qops", "pid": 1}],
            "queues": [], "tasks": {"t[/x]": {"failed": 1}}, "running": [],
            "failures": [{"time": 0.0, "uuid": "u", "name": "t[/x]", "hostname": "w[/1]@h",
                          "exception": TRICKY}]}
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True, color_system=None).print(
        top_view.rich_view(snap, top_view.View()))
    text = out.getvalue()
    assert TRICKY in text and "w[/1]@h" in text and "t[/x]" in text


def test_terminal_table_on_a_tty_shows_markup_like_text(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    Terminal(no_color=True).table(["id", "reason"], [["a", TRICKY]])
    assert TRICKY in capsys.readouterr().out
