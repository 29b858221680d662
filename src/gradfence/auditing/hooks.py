"""The forward hooks of an audit: GFR003, GFR005 (modules), GFR006, and the op watch.

Hooks fire in whichever thread runs the forward, which is what makes these checks see
worker threads: grad mode is per thread, so a forward in a ``ThreadPoolExecutor``
worker runs with grad enabled even when the audited block disabled it.

Entry-point modules (the audited roots, every module with children and every module
whose class defines ``forward`` outside torch) get a pre-hook and an ``always_call``
post-hook (which runs even when the forward raises). Per thread, they keep a stack of
markers, so that

* the :class:`~gradfence.auditing.ops.DropoutWatch` mode is on exactly while the forward
  of a module defined *outside* torch runs (only user code can call functional dropout
  unguarded: torch's own modules gate it on their ``training`` flag, which the hooks
  read, so the mode would only slow them down), and
* only the outermost audited forward of each thread checks GFR003 (did its output come
  back carrying an autograd graph?).

Torch's own modules whose behaviour follows their ``training`` flag (Dropout, BatchNorm,
RNN families) and those with a fused fast path (``TransformerEncoder(Layer)``,
``MultiheadAttention``) run with the mode popped: the first only pay for it (every op
through ``__torch_function__`` costs microseconds), and for the second an active
torch-function mode disables the fused path, which changes the results in the last bits.
``TransformerEncoderLayer`` also leaves its fused path when a module of its subtree has
a hook of its own, so that subtree is hooked through global module hooks instead.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn
from torch.compiler import is_dynamo_compiling
from torch.jit import ScriptModule
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from gradfence.auditing.collector import COMPILED, Collector, module_label
from gradfence.auditing.ops import DropoutWatch
from gradfence.errors import GradfenceWarning

_FAST_PATH = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)

# Markers on a thread's stack: what the matching post-hook has to undo. A marker >= 0
# means "suspended": the op watch was taken off at that depth of the mode stack and goes
# back there (not on top: a mode the user entered inside the forward sits above it and
# its own exit pops the top of the stack).
_NOTHING, _PUSHED = -2, -1


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.markers: list[int] = []
        self.watching = False  # is our mode on this thread's torch-function stack?


_torch_forward_cache: dict[type, bool] = {}


def _defined_in_torch(cls: type) -> bool:
    """True when ``cls.forward`` is torch's own code (only user code is watched for ops)."""
    result = _torch_forward_cache.get(cls)
    if result is None:
        forward = getattr(cls, "forward", None)
        result = str(getattr(forward, "__module__", "")).startswith("torch.")
        _torch_forward_cache[cls] = result
    return result


def _take_off_stack(mode: DropoutWatch | None) -> int:
    """Remove ``mode`` from this thread's torch-function mode stack, wherever it is.

    Modes pushed above it (a nested audit's, the user's) are put back in their order.
    Returns the depth it was at (the number of modes below it), or -1 when absent.
    """
    if mode is None:
        return -1
    above: list[Any] = []
    depth = -1
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            depth = torch._C._len_torch_function_stack()
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    return depth


def _put_back(mode: DropoutWatch | None, depth: int) -> None:
    """Push ``mode`` at ``depth`` of this thread's mode stack, below the modes now above it."""
    extra = torch._C._len_torch_function_stack() - depth
    if extra <= 0:  # the usual case: nothing was entered above it meanwhile
        torch._C._push_on_torch_function_stack(mode)
        return
    above = [torch._C._pop_torch_function_stack() for _ in range(extra)]
    torch._C._push_on_torch_function_stack(mode)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def _carries_graph(output: Any, depth: int = 0) -> bool:
    """True when a tensor in ``output`` (nested up to 3 levels) requires grad.

    Looks into lists, tuples, dicts and dataclass instances (model output records).
    """
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    if depth >= 3:
        return False
    if isinstance(output, list | tuple):
        return any(_carries_graph(item, depth + 1) for item in output)
    if isinstance(output, dict):
        return any(_carries_graph(item, depth + 1) for item in output.values())
    if is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, field.name, None) for field in fields(output))
        return any(_carries_graph(item, depth + 1) for item in items)
    return False


class Probe:
    """Installs the hooks on every audited module and removes them all again."""

    def __init__(
        self,
        collector: Collector,
        roots: tuple[nn.Module, ...],
        named: list[tuple[str, nn.Module]],
        checks: frozenset[str],
    ) -> None:
        self._collector = collector
        self._roots = roots
        self._named = named
        self._checks = checks
        self._state = _ThreadState()
        self._handles: list[RemovableHandle] = []
        # check code -> why it could not see everything, known at entry (see blind_checks)
        self.blind: dict[str, str] = {}
        names = {id(module): (name, type(module).__name__) for name, module in named}
        # The watch is switched on only in forwards of user-defined modules: without
        # any, it would never run, and the hooks that switch it off can be skipped.
        watch = "GFR005" in checks and any(
            not _defined_in_torch(type(module)) for _, module in named
        )
        self._mode = DropoutWatch(collector, names) if watch else None

    # installing ---------------------------------------------------------------------

    def install(self) -> None:
        """Register the hooks; on any failure, remove those already registered.

        Three kinds of module get hooks, the rest (the leaves doing the arithmetic) none,
        since a hooked module's call costs several microseconds more:

        * entry points (the audited roots, every module with children, every module
          whose forward is user code): a pre-hook and an ``always_call`` post-hook that
          push/pop the op watch and check GFR003 for the outermost audited forward of
          each thread;
        * torch's fast-path and mode-governed modules (Dropout, BatchNorm and RNN
          families): the same pair, which suspends the op watch around them and reads
          the ``training`` flag;
        * with the op watch off (``ignore=["GFR005"]``), mode-governed leaves get just
          one pre-hook that reads the flag.
        """
        if not self._checks & {"GFR003", "GFR005", "GFR006"}:
            return
        roots = {id(module) for module in self._roots}
        fused = _fused_subtrees(self._named)
        pre_table: dict[int, Callable[[nn.Module, Any], None]] = {}
        post_table: dict[int, Callable[[nn.Module, Any, Any], None]] = {}
        scripted: list[str] = []
        compiled: list[tuple[str, bool]] = []  # (label, is the graph the whole root forward?)
        try:
            for name, module in self._named:
                if isinstance(module, ScriptModule):
                    scripted.append(module_label(name, type(module).__name__))
                    continue  # TorchScript refuses forward hooks
                how = _compiled(module)
                if how is not None:
                    label = module_label(name, type(module).__name__)
                    whole = how == "in place" and id(module) in roots
                    compiled.append((f"{label}, {how}", whole))
                check = self._module_check(name, module)
                user = not _defined_in_torch(type(module))
                # torch's own mode-governed modules run with the watch off: their
                # dropout follows their flag, which `check` reads, and the watch would
                # only slow down (fast-path modules: change) what they compute.
                # A user subclass of a fast-path module too: its super().forward() takes
                # the fused path only with no mode on (the subclass's own functional
                # dropout goes unwatched, see docs/audit.md, Limits).
                # And a torch.compile wrapper: dynamo then traces what it traces without
                # the audit (an active mode is guarded on, and traced into the graph).
                suspend = self._mode is not None and (
                    isinstance(module, _FAST_PATH)
                    or (not user and check is not None)
                    or how == _WRAPPER
                )
                root = id(module) in roots
                entry = root or bool(module._modules) or user
                if id(module) in fused:  # see _fused_subtrees: hooked from the outside
                    if entry or suspend:
                        pre_table[id(module)] = self._pre(check, suspend, user, root)
                        post_table[id(module)] = self._post(name, module)
                    elif check is not None:
                        pre_table[id(module)] = _checker(check)
                elif entry or suspend:
                    pre = self._pre(check, suspend, user, root)
                    self._handles.append(module.register_forward_pre_hook(pre))
                    post = self._post(name, module)
                    self._handles.append(module.register_forward_hook(post, always_call=True))
                elif check is not None:
                    self._handles.append(module.register_forward_pre_hook(_checker(check)))
            if pre_table:
                self._handles.extend(_global_hooks(pre_table, post_table))
        except BaseException:
            self.remove()
            raise
        if compiled:
            codes = HOOKED_CHECKS if any(whole for _, whole in compiled) else ("GFR005", "GFR006")
            where = "; ".join(label for label, _ in compiled)
            self.blind.update(blind_checks(self._checks, codes, compiled_reason(where)))
        if scripted:
            reason = (
                f"inside TorchScript ({'; '.join(scripted)}), which takes no forward hooks; "
                "audit the eager module to check it"
            )
            self.blind.update(blind_checks(self._checks, HOOKED_CHECKS, reason))
            more = f" (and {len(scripted) - 1} more)" if len(scripted) > 1 else ""
            warnings.warn(
                GradfenceWarning(
                    f"gf.audit: {scripted[0]}{more} is TorchScript, which takes no forward hooks: "
                    "GFR003, GFR005 and GFR006 are not checked inside it (the entry/exit "
                    "checks are). Audit the eager module to get them."
                ),
                stacklevel=3,
            )

    def remove(self) -> None:
        """Remove every hook, and pop the op watch if this thread still has it on."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        state, mode = self._state, self._mode
        state.markers.clear()
        if state.watching:
            _take_off_stack(mode)
        state.watching = False

    # the hooks ----------------------------------------------------------------------

    def _pre(
        self, check: Callable[[nn.Module], None] | None, suspend: bool, user: bool, root: bool
    ) -> Callable[[nn.Module, Any], None]:
        state, mode = self._state, self._mode
        push = user and mode is not None

        def pre_hook(module: nn.Module, args: Any) -> None:
            if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
                COMPILED.hooks = True
                if root:
                    COMPILED.roots = True
                return
            marker = _NOTHING
            if suspend:
                if state.watching:
                    depth = _take_off_stack(mode)
                    if depth >= 0:
                        state.watching = False
                        marker = depth
            elif push and not state.watching:
                torch._C._push_on_torch_function_stack(mode)
                state.watching = True
                marker = _PUSHED
            state.markers.append(marker)
            if check is not None:
                check(module)

        return pre_hook

    def _post(self, name: str, module: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        state, mode = self._state, self._mode
        graph_check = "GFR003" in self._checks
        collector = self._collector
        label = module_label(name, type(module).__name__)

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if is_dynamo_compiling():
                return  # the pre-hook noted it
            markers = state.markers
            if not markers:
                return  # the forward began before the audit did
            marker = markers.pop()
            if marker == _PUSHED:
                _take_off_stack(mode)
                state.watching = False
            elif marker >= 0:
                _put_back(mode, marker)
                state.watching = True
            if graph_check and not markers and torch.is_grad_enabled() and _carries_graph(output):
                other = threading.get_ident() != collector.owner
                fix = (
                    "grad mode is per thread: disable it in the worker itself (wrap the "
                    "function the worker runs in torch.no_grad() or gf.inference(model))"
                    if other
                    else "run evaluation under gf.inference(model) or torch.no_grad() "
                    "(model.eval() does not disable grad)"
                )
                collector.add(
                    ("GFR003", name, other),
                    "GFR003",
                    name,
                    lambda thread: (
                        f"{label} ran its forward with grad enabled {thread}: its output "
                        f"carries an autograd graph that keeps every activation alive. "
                        f"Fix: {fix}."
                    ),
                    {"other_thread": other},
                )

        return post_hook

    # per-class checks (run in the pre-hook, where the flag that governs the forward is read)

    def _module_check(self, name: str, module: nn.Module) -> Callable[[nn.Module], None] | None:
        label = module_label(name, type(module).__name__)
        if "GFR005" in self._checks:
            rate_attr = _dropout_rate_attribute(module)
            if rate_attr is not None:
                return self._dropout_check(name, label, rate_attr)
        # Without running statistics a norm layer computes the same in train and eval
        # (batch statistics both ways): only a tracking one is hurt by train mode.
        tracking = isinstance(module, _NormBase) and module.track_running_stats
        if "GFR006" in self._checks and tracking:
            return self._norm_check(name, label)
        return None

    def _dropout_check(self, name: str, label: str, rate_attr: str) -> Callable[[nn.Module], None]:
        collector = self._collector

        def check(module: nn.Module) -> None:
            if not module.training:
                return
            rate = getattr(module, rate_attr, 0.0)
            if not (isinstance(rate, int | float) and rate > 0):
                return
            if isinstance(module, nn.RNNBase) and module.num_layers < 2:
                return  # an RNN applies its dropout only between layers
            collector.add(
                ("GFR005", name, threading.get_ident() != collector.owner),
                "GFR005",
                name,
                lambda thread: (
                    f"{label} ran with training=True {thread}: its dropout "
                    f"({rate_attr}={rate}) was active during evaluation. "
                    "Fix: evaluate under gf.inference(model) (or call model.eval() first)."
                ),
                {rate_attr: rate},
            )

        return check

    def _norm_check(self, name: str, label: str) -> Callable[[nn.Module], None]:
        collector = self._collector

        def check(module: nn.Module) -> None:
            if not module.training:
                return
            collector.add(
                ("GFR006", name, threading.get_ident() != collector.owner),
                "GFR006",
                name,
                lambda thread: (
                    f"{label} ran in training mode {thread}: its running statistics were "
                    "updated from evaluation data (BatchNorm ignores grad mode). Fix: "
                    "evaluate under gf.inference(model) (or call model.eval() first)."
                ),
            )

        return check


_WRAPPER = "a torch.compile wrapper"
HOOKED_CHECKS = ("GFR003", "GFR005", "GFR006")  # the checks made while forwards run


def blind_checks(checks: frozenset[str], codes: tuple[str, ...], where: str) -> dict[str, str]:
    """``{code: where}`` for each of ``codes`` that the audit runs (a report's ``blind``)."""
    return {code: where for code in codes if code in checks}


def compiled_reason(where: str) -> str:
    """Why checks were blind in compiled code, and how to get them back."""
    return (
        f"inside code compiled by torch.compile ({where}): its graph runs without the "
        "audit's hooks; to check it, run the block under "
        'torch.compiler.set_stance("force_eager")'
    )


def _compiled(module: nn.Module) -> str | None:
    """How ``module`` runs compiled: ``"a torch.compile wrapper"``, ``"in place"``, or None.

    ``torch.compile(m)`` returns a wrapper module whose own hooks run eagerly and whose
    inner modules run in the graph; ``m.compile()`` compiles ``m``'s whole call, hooks
    included. Dynamo is looked up only when it was imported (nothing compiled without).
    """
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "in place"
    dynamo = sys.modules.get("torch._dynamo")
    wrapper = getattr(dynamo, "OptimizedModule", None) if dynamo is not None else None
    if wrapper is not None and isinstance(module, wrapper):
        return _WRAPPER
    return None


def _fused_subtrees(named: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of every ``TransformerEncoderLayer`` and of every module inside one.

    Its fused fast path is off whenever any module of its subtree has a forward hook of
    its own (``torch/nn/modules/transformer.py``: "forward pre-/hooks are attached to the
    module"), and its results then differ in the last bits. Those modules are hooked
    through global module hooks instead, which that check does not see.
    """
    fused: set[int] = set()
    for _, module in named:
        if isinstance(module, nn.TransformerEncoderLayer) and id(module) not in fused:
            fused.update(id(inner) for inner in module.modules())
    return fused


def _global_hooks(
    pre_table: dict[int, Callable[[nn.Module, Any], None]],
    post_table: dict[int, Callable[[nn.Module, Any, Any], None]],
) -> list[RemovableHandle]:
    """A global pre-hook and ``always_call`` post-hook dispatching to the tables by id.

    Every module call in the process goes through them while the audit runs; for
    modules outside the tables they are one dict lookup.
    """
    find_pre, find_post = pre_table.get, post_table.get

    def pre_hook(module: nn.Module, args: Any) -> None:
        if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
            COMPILED.hooks = True
            return
        hook = find_pre(id(module))
        if hook is not None:
            hook(module, args)

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        if is_dynamo_compiling():
            return
        hook = find_post(id(module))
        if hook is not None:
            hook(module, args, output)

    handles = [register_module_forward_pre_hook(pre_hook)]
    handles.append(register_module_forward_hook(post_hook, always_call=True))
    return handles


def _checker(check: Callable[[nn.Module], None]) -> Callable[[nn.Module, Any], None]:
    def pre_hook(module: nn.Module, args: Any) -> None:
        if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
            COMPILED.hooks = True
            return
        check(module)

    return pre_hook


def _dropout_rate_attribute(module: nn.Module) -> str | None:
    """The attribute holding the dropout rate of a module whose flag governs dropout."""
    if isinstance(module, _DropoutNd):
        return "p"
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase):
        return "dropout"
    return None
