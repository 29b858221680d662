"""Evaluation done right: ``gf.evaluate``, ``gf.ShardedSampler`` and ``gradfence eval``."""

from __future__ import annotations

from gradfence.evaluation.loop import evaluate
from gradfence.evaluation.sampler import ShardedSampler

__all__ = ["ShardedSampler", "evaluate"]
