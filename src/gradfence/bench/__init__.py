"""``gradfence bench``: what no_grad, inference_mode and eval buy, measured on your model.

Modules: :mod:`~gradfence.bench.factories` turns ``--model``/``--input`` specs into
callables, :mod:`~gradfence.bench.builtins` holds the built-in models,
:mod:`~gradfence.bench.measure` takes the measurements, :mod:`~gradfence.bench.report`
renders them (terminal, JSON, Markdown, PNG) and :mod:`~gradfence.bench.cli` is the
command. ``python -m gradfence.bench._probe`` is the child process that measures the
peak RSS of one configuration on CPU.

This package imports nothing heavy at import time.
"""
