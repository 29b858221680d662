"""The built-in models of ``gradfence bench --model`` and ``gradfence eval --model``.

One registry for both commands: name -> description, model factory and input factory.
Factories are ``"module:callable"`` strings, resolved only when a command uses them, so
listing the names (``--help``) imports no torch. Adding a model is one entry::

    BUILTIN_MODELS["sentiment"] = BuiltinModel(
        "gradfence serve's default sentiment model",
        model="gradfence.serve.model:load_default",
        input="gradfence.bench.builtins:sentiment_input",
    )

``model`` is called with no arguments and returns an ``nn.Module``; ``input`` is called
with a batch size and returns a model input (a tensor, a list of texts, a tuple of
positional arguments, or a mapping of keyword arguments) for ``gradfence bench``.
``gradfence eval`` takes its data from ``--data`` instead (see
:mod:`gradfence.evaluation.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: a description and its two factories as ``module:callable``."""

    description: str
    model: str
    input: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "mlp": BuiltinModel(
        "MLP 784-1024-1024-10 with ReLU and Dropout(0.1), float32 inputs of shape (B, 784)",
        model="gradfence.bench.builtins:build_mlp",
        input="gradfence.bench.builtins:mlp_input",
    ),
    "cnn": BuiltinModel(
        "CNN conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, Dropout(0.1), Linear(4096, 10); "
        "inputs of shape (B, 3, 32, 32)",
        model="gradfence.bench.builtins:build_cnn",
        input="gradfence.bench.builtins:cnn_input",
    ),
    "toy": BuiltinModel(
        "nearest-centre classifier of three 2-D Gaussian blobs, with Dropout(0.5); "
        "inputs of shape (B, 2)",
        model="gradfence.evaluation.toy:toy_model",
        input="gradfence.bench.builtins:toy_input",
    ),
    "sentiment": BuiltinModel(
        "gradfence serve's default sentiment model (all-MiniLM-L6-v2 encoder and a linear "
        "head; needs gradfence[serve]), inputs: lists of held-out tweets",
        model="gradfence.serve.model:load_default",
        input="gradfence.bench.builtins:sentiment_input",
    ),
}
