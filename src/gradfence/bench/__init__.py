"""``gradfence bench``: what no_grad, inference_mode and eval buy, measured on your model.

Modules: :mod:`~gradfence.bench.workload` turns ``--model``/``--input`` specs into a
workload (built-in names from :mod:`gradfence.builtin_models`, whose bench factories
are in :mod:`~gradfence.bench.builtins`),
:mod:`~gradfence.bench.measure` takes the measurements, :mod:`~gradfence.bench.report`
renders them (terminal, JSON, Markdown, PNG) and :mod:`~gradfence.bench.cli` is the
command. ``python -m gradfence.bench._probe`` is the child process that measures the
peak RSS of one configuration on CPU.

This package imports nothing heavy at import time.
"""
