"""The one error type users see for bad input, and the skip-and-count helper batch jobs share."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike

logger = logging.getLogger(__name__)


class BadInput(ValueError):
    """A problem with an input file, printed as one line: ``FILE[:LINE]: what was expected``.

    CLIs catch it, print ``str(err)`` and exit 2 (never a traceback).
    """

    def __init__(self, path: str | PathLike | None, message: str, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.message = message
        where = "" if self.path is None else (f"{self.path}:{line}: " if line is not None else f"{self.path}: ")
        super().__init__(f"{where}{message}")

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the parent intact
        return type(self), (self.path, self.message, self.line)


@dataclass
class Problems:
    """Collects bad items in batch work: logs each one, counts them, raises at once when ``strict``."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    max_messages: int = 1000

    def add(self, err: BadInput | str, kind: str = "bad_input") -> None:
        if self.strict:
            raise err if isinstance(err, BadInput) else BadInput(None, str(err))
        self.counts[kind] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(str(err))
        logger.warning("skipped: %s", err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_kind": dict(self.counts), "messages": self.messages}
