"""What a rule reports: a :class:`Diagnostic` with an optional :class:`Fix` of text edits."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace the text between two positions (1-based lines, 0-based character columns)."""

    line: int
    col: int
    end_line: int
    end_col: int
    content: str


@dataclass(frozen=True, slots=True)
class Fix:
    """A rewrite: non-overlapping edits applied together.

    ``safe`` as ruff has it: a safe fix keeps the program's meaning (``--fix`` applies
    it); an unsafe one may change behaviour the author meant (only ``--unsafe-fixes``).
    """

    message: str
    edits: tuple[Edit, ...]
    safe: bool = True


# How sure a finding is, from its evidence: the default output shows HIGH only, and
# ``--preview`` shows LOW too.
HIGH = "high"
LOW = "low"
CONFIDENCES = (HIGH, LOW)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: ``path:line:col: CODE message`` (1-based line and column)."""

    code: str
    name: str
    message: str
    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    fix: Fix | None = field(default=None, compare=False)
    confidence: str = field(default=HIGH, compare=False)

    @property
    def sort_key(self) -> tuple[str, int, int, str]:
        """Order by file, position, code."""
        return (self.path, self.line, self.col, self.code)


_NEWLINE = re.compile(r"\r\n|\r|\n")


def split_lines(source: str) -> list[str]:
    """Split on the line ends the tokenizer recognises (not on form feeds and friends)."""
    return _NEWLINE.split(source)


class SourceText:
    """Converts AST positions (UTF-8 byte columns) into character columns.

    The source is split into lines only when a position is first converted.
    """

    __slots__ = ("_lines", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        """Source lines without line ends, numbered like the parser numbers them."""
        if self._lines is None:
            self._lines = split_lines(self.source)
        return self._lines

    def char_col(self, line: int, byte_col: int) -> int:
        """Character column of a byte offset on a 1-based line."""
        if not 1 <= line <= len(self.lines):
            return byte_col
        text = self.lines[line - 1]
        if text.isascii():
            return byte_col
        return len(text.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))

    def start(self, node: ast.AST) -> tuple[int, int]:
        """1-based line and 0-based character column where ``node`` starts."""
        line = getattr(node, "lineno", 1)
        return line, self.char_col(line, getattr(node, "col_offset", 0))

    def end(self, node: ast.AST) -> tuple[int, int]:
        """1-based line and 0-based character column where ``node`` ends."""
        end_line: int | None = getattr(node, "end_lineno", None)
        line = end_line if end_line is not None else int(getattr(node, "lineno", 1))
        col: int | None = getattr(node, "end_col_offset", None)
        if col is None:
            col = int(getattr(node, "col_offset", 0))
        return line, self.char_col(line, col)

    def segment(self, node: ast.AST) -> str:
        """Source text of a node."""
        (line, col), (end_line, end_col) = self.start(node), self.end(node)
        if line == end_line:
            return self.lines[line - 1][col:end_col]
        parts = [self.lines[line - 1][col:]]
        parts.extend(self.lines[line : end_line - 1])
        parts.append(self.lines[end_line - 1][:end_col])
        return "\n".join(parts)

    def insert_after(self, node: ast.AST, content: str) -> Edit:
        """An edit inserting ``content`` right after ``node``."""
        line, col = self.end(node)
        return Edit(line, col, line, col, content)

    def call_it(self, node: ast.AST, prefix: str = "") -> Fix:
        """The fix that adds the missing ``()`` after ``node`` (GF101, GF106, GF301)."""
        return Fix(f"Call it: `{prefix}{self.segment(node)}()`", (self.insert_after(node, "()"),))

    def replace(self, node: ast.AST, content: str) -> Edit:
        """An edit replacing the text of ``node``."""
        (line, col), (end_line, end_col) = self.start(node), self.end(node)
        return Edit(line, col, end_line, end_col, content)
