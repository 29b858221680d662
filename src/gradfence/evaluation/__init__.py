"""Evaluation done right: ``gf.evaluate``, ``gf.ShardedSampler`` and ``gradfence eval``.

Import the public names from :mod:`gradfence` (``gf.evaluate``, ``gf.ShardedSampler``).
This package imports nothing itself, so the ``gradfence eval`` CLI glue loads without torch.
"""
