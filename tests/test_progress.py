"""Progress bars in a log (stderr not a terminal): plain lines at most every few seconds, never carriage returns."""

from __future__ import annotations

import io
import time

from noisyrollout.progress import progress_bar


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_few_whole_lines(monkeypatch):
    monkeypatch.setenv("NOISYROLLOUT_PROGRESS_SECONDS", "0.2")
    log = Log()
    for _ in progress_bar(range(40), desc="sft", file=log):
        time.sleep(0.02)   # 0.8 s in all: a line about every 0.2 s, not one per item
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 10, lines
    assert all(line.startswith("sft:") for line in lines)
    assert "40/40" in lines[-1]                             # the last line says where it ended


def test_a_terminal_keeps_the_redrawn_bar():
    term = Terminal()
    for _ in progress_bar(range(5), desc="rl", file=term, mininterval=0):
        pass
    assert "\r" in term.getvalue()
