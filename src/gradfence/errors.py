"""The exception and warning types of gradfence: one per kind of misuse."""

from __future__ import annotations


class GradfenceError(Exception):
    """Base class of every error gradfence raises on purpose."""


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
