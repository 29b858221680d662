"""Where runtime findings land while an audit runs: thread-safe, one finding per cause.

A hook may fire thousands of times (once per batch, per worker thread); the collector
keeps the first occurrence of each cause and counts the rest, so a report stays short.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from gradfence.auditing.findings import Finding

MessageFn = Callable[[str], str]


class CompiledRuns:
    """What the audit's hooks leave behind when ``torch.compile`` traces them.

    Dynamo inlines module hooks into the graph it captures, and cannot trace what the
    checks do (thread ids, locks, frames): there, every hook only sets these flags and
    returns (``torch.compiler.is_dynamo_compiling()`` is True while tracing and a
    constant in the graph). Dynamo replays the attribute writes after every run of the
    compiled code, so they say "compiled code ran with the audit's hooks in it": the
    checks were blind inside it. One object for the process (a per-audit object would
    make dynamo recompile for every audit); the audits reset it when none is open.
    """

    __slots__ = ("hooks", "ops", "roots")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hooks = False  # a module hook ran inside compiled code
        self.roots = False  # ... the hook of an audited root (GFR003 blind too)
        self.ops = False  # the op watch saw a dropout function inside compiled code


COMPILED = CompiledRuns()


class Collector:
    """Findings keyed by cause; each key keeps its first message, a count and the threads."""

    __slots__ = ("_entries", "_lock", "closed", "owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[object, ...], _Entry] = {}
        self.owner = threading.get_ident()
        self.closed = False

    def add(
        self,
        key: tuple[object, ...],
        code: str,
        module: str,
        message: MessageFn,
        detail: dict[str, object] | None = None,
    ) -> None:
        """Record one occurrence; ``message(thread_phrase)`` is built only for the first one."""
        if self.closed:
            return
        thread = threading.current_thread()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                phrase = thread_phrase(thread, self.owner)
                entry = _Entry(code, module, message(phrase), dict(detail or {}))
                self._entries[key] = entry
            entry.count += 1
            if thread.name not in entry.threads:
                entry.threads.append(thread.name)

    def findings(self) -> list[Finding]:
        """One :class:`Finding` per cause, in the order the causes were first seen."""
        with self._lock:
            entries = list(self._entries.values())
        result = []
        for entry in entries:
            detail = dict(entry.detail)
            detail["count"] = entry.count
            detail["threads"] = list(entry.threads)
            message = entry.message
            if entry.count > 1:
                threads = f" on {len(entry.threads)} threads" if len(entry.threads) > 1 else ""
                message = f"{message} [seen {entry.count} times{threads}]"
            result.append(Finding(entry.code, message, entry.module, detail))
        return result


class _Entry:
    __slots__ = ("code", "count", "detail", "message", "module", "threads")

    def __init__(self, code: str, module: str, message: str, detail: dict[str, object]) -> None:
        self.code = code
        self.module = module
        self.message = message
        self.detail = detail
        self.count = 0
        self.threads: list[str] = []


def thread_phrase(thread: threading.Thread, owner: int) -> str:
    """``on thread 'X'`` plus, when X is not the thread that entered the audit, a warning."""
    if thread.ident == owner:
        return f"on thread {thread.name!r} (the audit's own thread)"
    return f"on thread {thread.name!r}, not the thread that entered the audit"


def module_label(name: str, cls: str) -> str:
    """How messages name a module: ``encoder.bn1 (BatchNorm1d)``, or the root's class."""
    return f"{name} ({cls})" if name else f"the audited {cls}"
