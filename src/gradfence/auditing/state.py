"""The checks made by comparing entry and exit: GFR001, GFR002, GFR004, GFR007.

They cost nothing while the block runs: grad/inference mode and every module's
``training`` flag are read twice, every parameter and buffer is fingerprinted twice
(identity, version counter, storage pointer) and, in strict mode, copied once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from gradfence import compat
from gradfence.auditing.collector import module_label
from gradfence.auditing.findings import Finding
from gradfence.scope import ModeSnapshot

# nn.Module's own bookkeeping in __dict__ (hook tables, _parameters, _buffers, ...):
# tensors in there are checked as parameters/buffers, or are not model state at all.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _mode_name(grad: bool, inference: bool) -> str:
    if inference:
        return "inference mode"
    return "grad enabled" if grad else "grad disabled"


def current_modes() -> tuple[bool, bool]:
    """This thread's ``(grad enabled, inference mode enabled)``."""
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def mode_leak(before: tuple[bool, bool], after: tuple[bool, bool], place: str) -> Finding | None:
    """A GFR001 finding when grad/inference mode ``after`` a block differs from ``before``.

    ``place`` says where, e.g. ``"on the audit's thread 'MainThread'"``.
    """
    if before == after:
        return None
    (grad_before, inference_before), (grad, inference) = before, after
    if inference != inference_before:
        cause = (
            "an inference_mode guard was entered and never exited"
            if inference
            else "an inference_mode block entered before was exited inside"
        )
        fix = "use torch.inference_mode() only as a with-block or decorator"
    else:
        cause = (
            "torch.set_grad_enabled(False) was called, or a no_grad context was left open"
            if not grad
            else "torch.set_grad_enabled(True) was called, or an enable_grad context was left open"
        )
        fix = (
            "use a with-block (torch.no_grad(), gf.inference(model)) instead of a bare "
            "set_grad_enabled() call"
        )
    message = (
        f"grad mode leaked {place}: {_mode_name(grad_before, inference_before)} on entry, "
        f"{_mode_name(grad, inference)} on exit ({cause}); everything that runs later on "
        f"this thread inherits it. Fix: {fix}."
    )
    detail: dict[str, object] = {
        "grad_enabled": [grad_before, grad],
        "inference_mode": [inference_before, inference],
    }
    return Finding("GFR001", message, "", detail)


class _Fingerprint:
    """What a tensor looked like at entry."""

    __slots__ = ("data_ptr", "lazy", "tensor", "value", "version")

    def __init__(self, tensor: torch.Tensor, strict: bool) -> None:
        self.tensor = tensor
        self.version: int | None = None
        self.data_ptr = 0
        self.value: torch.Tensor | None = None
        self.lazy = _lazy(tensor)
        if self.lazy:
            return  # materialised by the first forward: only its identity can be compared
        # Inference tensors have no version counter; strict mode's values cover them.
        self.version = None if tensor.is_inference() else compat.version(tensor)
        self.data_ptr = _data_ptr(tensor)
        self.value = _copy(tensor) if strict else None

    def change(self, now: torch.Tensor) -> str | None:
        """How ``now`` (the tensor under the same name at exit) differs, or None."""
        if now is not self.tensor:
            return "was replaced by another tensor"
        if self.lazy:
            return None
        if self.version is not None and not now.is_inference():
            version = compat.version(now)
            if version != self.version:
                return f"was modified in place (version {self.version} -> {version})"
        if _data_ptr(now) != self.data_ptr:
            return "had its storage swapped (.data = ... or set_())"
        if self.value is not None and not _same_values(self.value, now):
            return "changed value without a version bump (a .data write or an inference tensor)"
        return None


def _lazy(tensor: torch.Tensor) -> bool:
    """An uninitialised parameter/buffer of a Lazy module (most tensor methods raise on it)."""
    return bool(is_lazy(tensor))


def _data_ptr(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.data_ptr())
    except RuntimeError:  # e.g. sparse or tensor subclasses without storage
        return 0


def _copy(tensor: torch.Tensor) -> torch.Tensor | None:
    if tensor.layout is not torch.strided or tensor.is_meta:
        return None
    return tensor.detach().clone()


def _same_values(before: torch.Tensor, now: torch.Tensor) -> bool:
    if before.shape != now.shape or before.dtype != now.dtype:
        return False
    current = now.detach()
    if before.is_floating_point() or before.is_complex():
        try:  # NaN == NaN for this purpose; exact otherwise
            return bool(torch.allclose(before, current, rtol=0.0, atol=0.0, equal_nan=True))
        except (RuntimeError, NotImplementedError):  # dtypes without allclose (float8)
            pass
    return torch.equal(before, current)


def _state_tensors(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(kind, attribute, tensor) for the module's own parameters and buffers."""
    for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
        yield "parameter", attr, param
    for attr, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
        yield "buffer", attr, buffer


def _recomputed_attributes(module: nn.Module) -> set[str]:
    """Attributes that torch's old ``weight_norm``/``spectral_norm`` rebuild before each forward.

    Their pre-hook stores the reparametrised weight as a plain attribute at every call,
    so one made in inference mode is replaced by the next forward: not stale state.
    """
    return {
        hook.name
        for hook in compat.forward_pre_hooks(module)
        if isinstance(hook, WeightNorm | SpectralNorm)
    }


def _attribute_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Plain tensor attributes (one level into lists, tuples and dicts): caches and such."""
    recomputed = _recomputed_attributes(module) if compat.forward_pre_hooks(module) else set()
    for attr, value in vars(module).items():
        if attr in _MODULE_INTERNALS or attr in recomputed:
            continue
        if isinstance(value, torch.Tensor):
            yield attr, value
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    yield f"{attr}[{i}]", item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, torch.Tensor):
                    yield f"{attr}[{key!r}]", item


class StateSnapshot:
    """Entry state of an audit; :meth:`findings` compares it with the state at exit."""

    def __init__(
        self,
        roots: tuple[nn.Module, ...],
        named: list[tuple[str, nn.Module]],
        checks: frozenset[str],
        strict: bool,
    ) -> None:
        self._roots = roots
        self._named = named
        self._checks = checks
        self._grad = torch.is_grad_enabled()
        self._inference = torch.is_inference_mode_enabled()
        self._modes = ModeSnapshot(roots) if "GFR002" in checks else None
        self._tensors: dict[int, dict[str, tuple[str, _Fingerprint]]] = {}
        if "GFR004" in checks:
            for _, module in named:
                self._tensors[id(module)] = {
                    attr: (kind, _Fingerprint(tensor, strict))
                    for kind, attr, tensor in _state_tensors(module)
                }
        # id -> tensor: holding the tensor keeps its id from being reused by a new one
        self._inference_at_entry: dict[int, torch.Tensor] = {}
        if "GFR007" in checks:
            for _, module in named:
                for _, tensor in self._all_tensors(module):
                    if not _lazy(tensor) and tensor.is_inference():
                        self._inference_at_entry[id(tensor)] = tensor

    def findings(self) -> list[Finding]:
        """Every difference between entry and now that breaks the evaluation contract."""
        found: list[Finding] = []
        if "GFR001" in self._checks:
            found.extend(self._grad_mode())
        if self._modes is not None:
            found.extend(self._module_modes(self._modes))
        if "GFR004" in self._checks:
            found.extend(self._mutations())
        if "GFR007" in self._checks:
            found.extend(self._inference_tensors())
        return found

    # GFR001 -------------------------------------------------------------------------

    def _grad_mode(self) -> list[Finding]:
        place = f"on the audit's thread {threading.current_thread().name!r}"
        finding = mode_leak((self._grad, self._inference), current_modes(), place)
        return [] if finding is None else [finding]

    # GFR002 -------------------------------------------------------------------------

    def _module_modes(self, entry: ModeSnapshot) -> list[Finding]:
        changed: dict[str, tuple[str, bool, bool]] = {}  # name -> (class, before, after)
        for name, module in self._named:  # pre-order: parents before their children
            position = entry.index.get(id(module))
            if position is None:
                continue
            before = entry.flags[position]
            if module.training is not before:
                changed[name] = (type(module).__name__, before, module.training)
        found: list[Finding] = []
        heads: dict[str, list[str]] = {}  # reported name -> names it stands for
        for name, (_, before, _) in changed.items():
            head = _changed_ancestor(name, changed, before)
            if head is not None and head in heads:
                heads[head].append(name)
                continue
            heads[name] = [name]
        for head, members in heads.items():
            cls, before, after = changed[head]
            flip = f"{_flag(before)} -> {_flag(after)}"
            where = head or f"the audited {cls}"
            more = f" (and {len(members) - 1} submodule(s) with it)" if len(members) > 1 else ""
            message = (
                f"{where}: {flip}{more}: the block changed the module's mode and did not "
                "restore it, so the code after it runs in the wrong mode. Fix: scope the "
                "change with gf.inference(model) or gf.training(model), which restore every "
                "submodule's flag on exit."
            )
            found.append(Finding("GFR002", message, head, {"modules": members, "change": flip}))
        return found

    # GFR004 -------------------------------------------------------------------------

    def _mutations(self) -> list[Finding]:
        found: list[Finding] = []
        for name, module in self._named:
            changes: list[str] = []
            now = {attr: (kind, tensor) for kind, attr, tensor in _state_tensors(module)}
            for attr, (kind, fingerprint) in self._tensors.get(id(module), {}).items():
                current = now.pop(attr, None)
                if current is None:
                    changes.append(f"{kind} {attr} was removed")
                    continue
                change = fingerprint.change(current[1])
                if change is not None:
                    changes.append(f"{kind} {attr} {change}")
            changes.extend(f"{kind} {attr} was added" for attr, (kind, _) in now.items())
            if not changes:
                continue
            label = module_label(name, type(module).__name__)
            message = (
                f"{label}: {'; '.join(changes)} during the audit (seen at exit): evaluation "
                "changed model state. Fix: evaluate in eval mode under gf.inference(model) "
                "and keep writes to parameters and buffers out of evaluation code."
            )
            found.append(Finding("GFR004", message, name, {"changes": changes}))
        return found

    # GFR007 -------------------------------------------------------------------------

    def _all_tensors(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for kind, attr, tensor in _state_tensors(module):
            yield f"{kind} {attr}", tensor
        for attr, tensor in _attribute_tensors(module):
            yield f"attribute {attr}", tensor

    def _inference_tensors(self) -> list[Finding]:
        found: list[Finding] = []
        inherited: list[tuple[str, str]] = []  # (module name, tensor) inference at entry
        for name, module in self._named:
            for what, tensor in self._all_tensors(module):
                if _lazy(tensor) or not tensor.is_inference():
                    continue
                if self._inference_at_entry.get(id(tensor)) is tensor:
                    inherited.append((name, what))
                    continue
                label = module_label(name, type(module).__name__)
                message = (
                    f"{label}: {what} is an inference tensor at exit: it was made inside "
                    "torch.inference_mode() during the audit and kept as model state, so the "
                    "next training step that uses it fails ('Inference tensors cannot be "
                    "saved for backward'). Fix: evaluate with gf.inference(model) (no_grad) "
                    "when the forward writes module state, or store a .clone() made outside "
                    "inference_mode."
                )
                found.append(Finding("GFR007", message, name, {"tensor": what}))
        if inherited:
            found.append(_inherited_inference_state(inherited))
        return found


def _inherited_inference_state(tensors: list[tuple[str, str]]) -> Finding:
    """One finding for model state that already was inference tensors when the audit began.

    A model built or loaded under ``torch.inference_mode()`` has every parameter in this
    state: one finding for all of them, since the block did not cause it.
    """
    qualified = []
    for name, what in tensors:  # "parameter weight" in module "0" -> "parameter 0.weight"
        kind, attr = what.split(" ", 1)
        qualified.append(f"{kind} {name}.{attr}" if name else what)
    shown = "; ".join(qualified[:3]) + ("; ..." if len(qualified) > 3 else "")
    modules = {name for name, _ in tensors}
    module = modules.pop() if len(modules) == 1 else ""
    message = (
        f"{len(tensors)} parameter(s), buffer(s) or tensor attribute(s) of the audited "
        f"modules were already inference tensors when the audit began ({shown}): the model "
        "was built or loaded inside torch.inference_mode(), so a training step that uses "
        "them fails ('Inference tensors cannot be saved for backward'). Fix: build or load "
        "the model outside inference_mode (or replace these tensors with .clone()s made "
        "outside it)."
    )
    return Finding("GFR007", message, module, {"tensors": qualified, "at_entry": True})


def _flag(training: bool) -> str:
    return "train" if training else "eval"


def _changed_ancestor(
    name: str, changed: dict[str, tuple[str, bool, bool]], before: bool
) -> str | None:
    """The topmost ancestor reached through ancestors that all changed the same way."""
    parts = name.split(".") if name else []
    head: str | None = None
    while parts:
        parts.pop()
        parent = ".".join(parts)
        info = changed.get(parent)
        if info is None or info[1] is not before:
            break
        head = parent
    return head
