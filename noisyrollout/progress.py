"""Progress bars that read well in a terminal and in a log.

In a terminal, a tqdm bar redraws itself in place. When stderr is not a terminal (`dvc repro` logs, CI output, a
Prefect task), the same bar instead writes one plain line at most every `NOISYROLLOUT_PROGRESS_SECONDS` (default 10)
and a last one when it ends, rather than thousands of carriage-return frames on one line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

ENV = "NOISYROLLOUT_PROGRESS_SECONDS"
LOG_SECONDS = 10.0


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, line by line and at most every few seconds when stderr is not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not stream.isatty():
        kwargs.setdefault("mininterval", float(os.environ.get(ENV, LOG_SECONDS)))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
        stream = _Lines(stream)
    return tqdm(iterable, file=stream, **kwargs)
