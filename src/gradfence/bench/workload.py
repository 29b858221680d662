"""What ``gradfence bench`` measures: ``--model``/``--input`` specs resolved to a workload.

A spec is a built-in name (:data:`gradfence.builtin_models.BUILTIN_MODELS`),
``module:factory`` or ``file.py:factory`` (resolved by :mod:`gradfence.factories`).

A :class:`Workload` is the resolved pair. It is made of strings only (built-in name, or
``module:attr`` / absolute ``path.py:attr``) so that the child process measuring peak
memory can rebuild exactly the same model and input from its command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfence.batches import tensors_in
from gradfence.builtin_models import BUILTIN_MODELS
from gradfence.errors import UsageError
from gradfence.factories import is_file, one_line, resolve, split

if TYPE_CHECKING:
    from torch import nn

SEED = 0


@dataclass(frozen=True)
class Workload:
    """What to benchmark: a model factory and an input factory, both as specs.

    ``label`` is what the user typed for ``--model``; the two specs are normalised
    (built-in expanded, file paths made absolute).
    """

    label: str
    model_spec: str
    input_spec: str

    def build_model(self) -> nn.Module:
        """Call the model factory (after seeding torch with :data:`SEED`)."""
        import torch
        from torch import nn

        factory = resolve(self.model_spec, "--model")
        torch.manual_seed(SEED)
        model = factory if isinstance(factory, nn.Module) else _call(factory, self.model_spec)
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"model factory {self.model_spec} returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    def make_input(self, batch_size: int) -> Any:
        """Call the input factory with ``batch_size`` (after seeding torch with :data:`SEED`)."""
        import torch

        factory = resolve(self.input_spec, "--input")
        torch.manual_seed(SEED)
        value = _call(factory, self.input_spec, batch_size)
        if not tensors_in(value) and not _is_texts(value):
            raise UsageError(
                f"input factory {self.input_spec} returned {type(value).__name__} holding no "
                "tensor: return a tensor, a list of texts, a tuple of arguments or a dict of "
                "keyword arguments"
            )
        return value


def _is_texts(value: Any) -> bool:
    """A non-empty list of strings: the input of a text model (it tokenizes inside)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def workload(model: str, input_spec: str | None) -> Workload:
    """Check the ``--model``/``--input`` specs and normalise them (nothing is imported yet)."""
    builtin = BUILTIN_MODELS.get(model)
    if builtin is not None:
        chosen_input = builtin.input if input_spec is None else _normalise(input_spec, "--input")
        return Workload(model, builtin.model, chosen_input)
    if ":" not in model:
        names = ", ".join(sorted(BUILTIN_MODELS))
        raise UsageError(
            f"unknown model {model!r}: use a built-in ({names}), MODULE:FACTORY or "
            "path/to/file.py:FACTORY"
        )
    if input_spec is None:
        raise UsageError(
            f"--model {model} needs --input MODULE:FACTORY, a function batch_size -> model input"
        )
    return Workload(model, _normalise(model, "--model"), _normalise(input_spec, "--input"))


def _normalise(spec: str, option: str) -> str:
    """Check the form of a spec; make a file path absolute (child processes load it too)."""
    target, attr = split(spec, option)
    if is_file(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"{option} {spec!r}: no such file {target}")
        return f"{path}:{attr}"
    return spec


def _call(factory: Any, spec: str, *args: Any) -> Any:
    try:
        return factory(*args)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"factory {spec} raised {one_line(exc)}") from None
