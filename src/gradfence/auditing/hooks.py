"""The forward hooks of an audit: GFR003, GFR005 (modules) and GFR006.

Hooks fire in whichever thread runs the forward, which is what makes these checks see
worker threads: grad mode is per thread, so a forward in a ``ThreadPoolExecutor``
worker runs with grad enabled even when the audited block disabled it.

Only two kinds of module get hooks, since a hooked module's call costs a few
microseconds more; the leaves doing the arithmetic get none:

* mode-governed modules (BatchNorm and RNN families, ``MultiheadAttention``, Dropout
  subclasses with a ``forward`` of their own): a pre-hook reading the ``training`` flag
  that governs what the forward does. torch's own Dropout classes need none: the op
  watch (:mod:`gradfence.auditing.ops`) sees the ``F.dropout`` call their forward makes;
* entry points (the audited roots, every module with children, every module whose
  class defines ``forward`` outside torch): a forward hook checking GFR003 (with grad
  enabled, did the output come back carrying an autograd graph?). Every entry point
  that built a graph records it; at exit, :func:`outermost` keeps the outermost.

None of them is an ``always_call`` hook and none keeps per-thread state across a
forward, so a forward that raises leaves nothing behind; and ``torch.compile`` can
inline them without recompiling for every audit (an ``always_call`` hook is guarded
on by its id, which is new for every audit).

``TransformerEncoderLayer`` leaves its fused fast path when a module of its subtree
has a hook of its own, so that subtree is hooked through global module hooks instead.
Functional dropout (``F.dropout``, SDPA ``dropout_p``) is watched by
:mod:`gradfence.auditing.ops`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn
from torch.compiler import is_dynamo_compiling
from torch.jit import ScriptModule
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from gradfence import compat
from gradfence.auditing.collector import COMPILED, Collector, module_label
from gradfence.auditing.findings import Finding
from gradfence.errors import GradfenceWarning

# torch's own mode-governed classes (public names; their subclasses count too)
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_NORM_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)

_torch_forward_cache: dict[type, bool] = {}


def _defined_in_torch(cls: type) -> bool:
    """True when ``cls.forward`` is torch's own code (user code gets a GFR003 hook)."""
    result = _torch_forward_cache.get(cls)
    if result is None:
        forward = getattr(cls, "forward", None)
        result = str(getattr(forward, "__module__", "")).startswith("torch.")
        _torch_forward_cache[cls] = result
    return result


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


def outermost(findings: list[Finding]) -> list[Finding]:
    """GFR003 findings without those of modules inside another flagged one (same thread kind).

    A forward that builds a graph makes every entry point around it build one too:
    the report names the outermost, as the user called it.
    """
    flagged = {(f.module, f.detail.get("other_thread")) for f in findings if f.code == "GFR003"}

    def inside_another(finding: Finding) -> bool:
        parts = finding.module.split(".") if finding.module else []
        other = finding.detail.get("other_thread")
        while parts:
            parts.pop()
            if (".".join(parts), other) in flagged:
                return True
        return False

    return [f for f in findings if f.code != "GFR003" or not inside_another(f)]


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
        self._handles: list[RemovableHandle] = []
        # check code -> why it could not see everything, known at entry (see blind_checks)
        self.blind: dict[str, str] = {}

    # installing ---------------------------------------------------------------------

    def install(self) -> None:
        """Register the hooks; on any failure, remove those already registered."""
        if not self._checks & {"GFR003", "GFR005", "GFR006"}:
            return
        roots = {id(module) for module in self._roots}
        fused = _fused_subtrees(self._named)
        graph_check = "GFR003" in self._checks
        pre_table: dict[int, Callable[[nn.Module, Any], None]] = {}
        post_table: dict[int, Callable[[nn.Module, Any, Any], None]] = {}
        scripted: list[str] = []
        compiled: list[tuple[str, bool]] = []  # (label, is the graph the whole root forward?)
        try:
            for name, module in self._named:
                if isinstance(module, ScriptModule):
                    scripted.append(module_label(name, type(module).__name__))
                    continue  # TorchScript refuses forward hooks
                root = id(module) in roots
                how = _compiled(module)
                if how is not None:
                    label = module_label(name, type(module).__name__)
                    compiled.append((f"{label}, {how}", how == "in place" and root))
                check = self._module_check(name, module)
                entry = graph_check and (
                    root
                    or next(module.children(), None) is not None
                    or not _defined_in_torch(type(module))
                )
                pre = _checker(check) if check is not None else None
                post = self._graph_check(name, module, root) if entry else None
                if id(module) in fused:  # see _fused_subtrees: hooked from the outside
                    if pre is not None:
                        pre_table[id(module)] = pre
                    if post is not None:
                        post_table[id(module)] = post
                    continue
                if pre is not None:
                    self._handles.append(module.register_forward_pre_hook(pre))
                if post is not None:
                    self._handles.append(module.register_forward_hook(post))
            if pre_table or post_table:
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
        """Remove every hook."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # the hooks ----------------------------------------------------------------------

    def _graph_check(
        self, name: str, module: nn.Module, root: bool
    ) -> Callable[[nn.Module, Any, Any], None]:
        collector = self._collector
        label = module_label(name, type(module).__name__)

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
                COMPILED.hooks = True
                if root:
                    COMPILED.roots = True
                return
            if not (torch.is_grad_enabled() and _carries_graph(output)):
                return
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
            # torch's own Dropout classes call the watched F.dropout* with their flag:
            # the op watch reports them by module (ops.py) and they need no hook
        # Without running statistics a norm layer computes the same in train and eval
        # (batch statistics both ways): only a tracking one is hurt by train mode.
        tracking = isinstance(module, _NORM_MODULES) and bool(module.track_running_stats)
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
            record_dropout_module(collector, name, label, rate_attr, rate)

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
    if compat.compiled_in_place(module):
        return "in place"
    if compat.is_compile_wrapper(module):
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
    """A global pre-hook and post-hook dispatching to the tables by id.

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
    handles.append(register_module_forward_hook(post_hook))
    return handles


def _checker(check: Callable[[nn.Module], None]) -> Callable[[nn.Module, Any], None]:
    def pre_hook(module: nn.Module, args: Any) -> None:
        if is_dynamo_compiling():  # traced by torch.compile: see CompiledRuns
            COMPILED.hooks = True
            return
        check(module)

    return pre_hook


def record_dropout_module(
    collector: Collector, name: str, label: str, rate_attr: str, rate: object
) -> None:
    """GFR005 for a module whose ``training`` flag turned its dropout on."""
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


def _dropout_rate_attribute(module: nn.Module) -> str | None:
    """The attribute holding the dropout rate of a module whose flag governs dropout.

    None for torch's own Dropout classes: the op watch sees their ``F.dropout*`` call.
    A subclass with a ``forward`` of its own is read here, whatever that forward calls.
    """
    if isinstance(module, DROPOUT_MODULES):
        return None if _defined_in_torch(type(module)) else "p"
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase):
        return "dropout"
    return None
