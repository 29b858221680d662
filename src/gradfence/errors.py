"""The exception and warning types of gradfence: one per kind of misuse."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how a user's exception is reported in one line.

    >>> one_line(RuntimeError("no GPU here\\nsecond line"))
    'RuntimeError: no GPU here'
    """
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class GradfenceError(Exception):
    """Base class of every error gradfence raises on purpose."""


class UsageError(GradfenceError):
    """Bad command-line input: the CLI reports it as one line on stderr, exit status 2.

    Library code behind a subcommand raises it (never one from :mod:`gradfence.cli`),
    so that the layers depend downwards only.
    """


class MissingDependencyError(GradfenceError, ImportError):
    """A part of gradfence needs a package that is not installed.

    The message names the part, the package and the install command, e.g.
    ``gf.inference needs torch, which is not installed: pip install 'gradfence[torch]'``.
    The core distribution installs no heavy dependency (``gradfence lint`` and the flake8
    plugin need none); :data:`EXTRAS` says which extra provides each optional package.
    """

    @classmethod
    def of(cls, exc: ModuleNotFoundError, needed_by: str) -> MissingDependencyError | None:
        """The error to raise for ``exc`` inside ``needed_by``; None when ``exc`` is not
        about an optional dependency (a bug or a user's module: let it propagate)."""
        package = (exc.name or "").partition(".")[0]
        extra = EXTRAS.get(package)
        if extra is None:
            return None
        return cls(
            f"{needed_by} needs {package}, which is not installed: pip install 'gradfence[{extra}]'"
        )


# optional top-level module -> the extra of the gradfence distribution that installs it
EXTRAS: dict[str, str] = {
    "torch": "torch",
    "torchmetrics": "torch",
    "tqdm": "torch",
    "matplotlib": "bench",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "transformers": "serve",
    "safetensors": "serve",
    "ray": "ray",
}


class ScopeError(GradfenceError, TypeError):
    """A grad/module scope was misused: wrong argument, unknown mode, impossible nesting.

    Subclasses :class:`TypeError` too, since most misuse is a wrong argument.
    """


class AuditError(GradfenceError, AssertionError):
    """An audited block broke the evaluation contract; the message lists every finding."""


class GradfenceWarning(UserWarning):
    """Base class of gradfence's warnings (filter them all with this category)."""


class ScopeOverlapWarning(GradfenceWarning, RuntimeWarning):
    """Two scopes with different targets are active on the same module in different threads.

    Module ``training`` flags are plain attributes shared by every thread, so both scopes
    cannot hold at once: each sees the flags the other last wrote.
    """


class EvaluationError(GradfenceError, ValueError):
    """``gf.evaluate`` was given something it cannot evaluate: a batch, step or metric.

    Subclasses :class:`ValueError` too, since it is always a wrong value handed in.
    """


class DuplicateSamplesWarning(GradfenceWarning, RuntimeWarning):
    """A distributed evaluation's sampler pads or drops samples, so the result is not exact.

    ``torch.utils.data.DistributedSampler`` pads every shard to the same length with
    repeated samples (or drops the tail with ``drop_last=True``): the metrics then
    count some samples twice (or never). Use ``gf.ShardedSampler`` for evaluation.
    """
