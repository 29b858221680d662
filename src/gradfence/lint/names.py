"""What identifiers say: evaluation functions and validation loaders, by their words."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
EVAL_TOKENS = frozenset(
    {
        "validate",
        "validation",
        "valid",
        "val",
        "evaluate",
        "evaluation",
        "eval",
        "evaluator",
        "test",
        "testing",
        "predict",
        "prediction",
        "predictions",
        "infer",
        "inference",
    }
)
_TEST_FUNCTIONS = frozenset(
    {"test", "test_epoch", "test_loop", "test_one_epoch", "run_test", "do_test", "eval_test"}
)
_TRAIN_TOKENS = frozenset({"train", "training", "fit", "step", "update", "backward"})
_LOADER_TOKENS = frozenset({"val", "valid", "validation", "test", "eval", "evaluation", "dev"})
# framework hooks that the framework already runs under eval() and no_grad()
FRAMEWORK_EVAL_HOOKS = frozenset(
    {
        "validation_step",
        "test_step",
        "predict_step",
        "on_validation_epoch_end",
        "on_test_epoch_end",
        "on_predict_epoch_end",
        "validation_epoch_end",
        "test_epoch_end",
        "on_validation_batch_end",
        "on_test_batch_end",
        "on_predict_batch_end",
        "generate",
    }
)


# cheap substring test before splitting an identifier into words
_EVAL_HINTS = re.compile("val|test|pred|infer|dev", re.IGNORECASE)


def might_evaluate(name: str) -> bool:
    """Fast pre-check: could ``name`` contain an evaluation or loader word at all?"""
    return _EVAL_HINTS.search(name) is not None


def tokens(name: str) -> set[str]:
    """Lower-case word tokens of an identifier (``validate_epoch`` -> {validate, epoch})."""
    return set(_TOKEN.findall(_CAMEL.sub(r"\1_\2", name).lower()))


def is_eval_name(name: str) -> bool:
    """A function name that says it evaluates (validate, evaluate, test, predict, infer...).

    Pytest tests (``test_*``), framework hooks and names that also train
    (``train_and_validate``) do not count.
    """
    if not might_evaluate(name) or name.startswith("<") or name in FRAMEWORK_EVAL_HOOKS:
        return False
    if name.startswith(("test_", "Test")) and name not in _TEST_FUNCTIONS:
        return False  # a pytest test, whatever else its name says
    words = tokens(name)
    if "test" in words and name not in _TEST_FUNCTIONS:
        # ``test_*`` and ``*_test`` are test-suite functions far more often than evaluations
        words = words - {"test", "testing"}
    return bool(words & EVAL_TOKENS) and not words & _TRAIN_TOKENS


def is_eval_loader(words: set[str]) -> bool:
    """Words of a loop's iterable that name validation or test data (``val_loader``...)."""
    return bool(words & _LOADER_TOKENS) and "train" not in words
