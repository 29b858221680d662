"""Pretrained parts: the mode a loaded or frozen module is really in.

- GF309: a frozen pretrained submodule left to follow the parent's ``train()``
- GF310: a ``from_pretrained`` model (returned in eval mode) trained without ``.train()``
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from gradfence.lint.diagnostics import LOW
from gradfence.lint.imports import ImportMap, dotted
from gradfence.lint.model import FileModel
from gradfence.lint.rules.frames import (
    Function,
    constructs_optimiser,
    functions,
    is_false,
    is_true,
    local_callees,
    local_nodes,
    module_of,
    names_read,
    parameters_of,
    target_names,
)
from gradfence.lint.rules.registry import Hit, rule

# -- GF309 / GF310: pretrained parts ---------------------------------------------------------


def _is_pretrained_load(value: ast.expr) -> bool:
    """``X.from_pretrained(...)``, ``torch.hub.load(...)``, ``create_model(..., pretrained=True)``,
    ``resnet50(pretrained=True)`` / ``(weights=...)``, possibly followed by ``.to()``."""
    while (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in {"to", "cuda", "cpu", "eval", "half", "float", "requires_grad_"}
    ):
        value = value.func.value
    if not isinstance(value, ast.Call):
        return False
    name = dotted(value.func) or ""
    if re.search(r"(\.|^)(from_pretrained|from_single_file)$", name) or name == "torch.hub.load":
        return True
    for keyword in value.keywords:
        if keyword.arg == "pretrained" and is_true(keyword.value):
            return True
        if (
            keyword.arg == "weights"
            and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is None)
            and name.rsplit(".", 1)[-1][:1].islower()
        ):
            return True
    return False


def _built_elsewhere(value: ast.expr, imports: ImportMap) -> bool:
    """A module made by a call that is not a ``torch.nn`` layer constructor: a model of the
    project or of a library, whose weights a freeze suggests were loaded."""
    if not isinstance(value, ast.Call):
        return False
    qual = imports.resolve(value.func) or ""
    return not qual.startswith("torch.") and dotted(value.func) is not None


def _is_from_pretrained(value: ast.expr) -> bool:
    """``X.from_pretrained(...)`` (Hugging Face loaders return eval mode)."""
    while (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in {"to", "cuda", "cpu", "half", "float", "bfloat16"}
    ):
        value = value.func.value
    if not isinstance(value, ast.Call):
        return False
    name = dotted(value.func) or ""
    return name.endswith(".from_pretrained") and not name.split(".")[-2].endswith(
        ("Tokenizer", "TokenizerFast", "Processor", "Config", "FeatureExtractor")
    )


def _frozen_targets(node: ast.AST) -> dict[str, ast.AST]:
    """Modules frozen under ``node``: ``m.requires_grad_(False)`` and
    ``for p in m.parameters(): p.requires_grad = False`` (any loop variable)."""
    frozen: dict[str, ast.AST] = {}
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr == "requires_grad_"
            and sub.args
            and is_false(sub.args[0])
        ):
            target = module_of(sub.func.value)
            if target is not None:
                frozen.setdefault(target, sub)
        if isinstance(sub, ast.For | ast.AsyncFor) and isinstance(sub.target, ast.Name):
            owner = parameters_of(sub.iter)
            variable = sub.target.id
            if owner is None:
                continue
            for stmt in ast.walk(sub):
                if (
                    isinstance(stmt, ast.Assign)
                    and is_false(stmt.value)
                    and any(
                        isinstance(t, ast.Attribute)
                        and t.attr == "requires_grad"
                        and isinstance(t.value, ast.Name)
                        and t.value.id == variable
                        for t in stmt.targets
                    )
                ):
                    frozen.setdefault(owner, sub)
    return frozen


def _keeps_eval(cls: ast.ClassDef, name: str) -> bool:
    """The class keeps ``name`` in eval outside ``__init__``: ``.eval()`` or ``.train(False)``
    in another method, a ``train()`` override (it may reach the child by name, as
    ``named_children()`` does), or ``name.train = ...``."""
    for function in cls.body:
        if not isinstance(function, Function):
            continue
        if function.name == "train":
            return True  # the class decides its children's modes itself
        for sub in ast.walk(function):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    if dotted(target) in {f"{name}.train", f"{name}.eval"}:
                        return True
            if function.name == "__init__":
                continue
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Attribute)
                and sub.func.attr in {"eval", "train"}
                and module_of(sub.func.value) == name
            ) and (sub.func.attr == "eval" or (sub.args and is_false(sub.args[0]))):
                return True
    return False


@rule(
    "GF309",
    "frozen-module-left-training",
    "a frozen pretrained submodule follows the parent's `train()`: dropout and BatchNorm run",
)
def frozen_module_left_training(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports a pretrained submodule that a module freezes (`requires_grad_(False)`, or
    `p.requires_grad = False` over its parameters) and never keeps in eval mode: no
    `.eval()` outside `__init__`, no `train()` override that handles it, no
    `submodule.train = ...` that disables its mode changes.

    ## Evidence
    The attribute is bound to a pretrained load (`from_pretrained`,
    `torch.hub.load`, `create_model(..., pretrained=True)`, a constructor with
    `pretrained=True` or `weights=`) and frozen in the same class: confidence high. A
    frozen attribute built by any other call that is not a `torch.nn` layer (a project's
    or a library's model factory, whose weights the freeze suggests were loaded) is a
    low-confidence finding, shown with `--preview`.

    ## Why is this a problem?
    Freezing stops gradient updates, not training behaviour. `model.train()` recurses into
    every child, so at the first training step the frozen part runs with dropout on and
    its BatchNorm layers update their running statistics from every training batch. The
    frozen features drift and are noisy, although no weight changed.

    **Hidden detail.** `.eval()` in `__init__` (or the eval mode `from_pretrained`
    returns) does not last: the training loop's `model.train()` undoes it. The mode must
    be set again after every `train()`, which is what a `train()` override does.

    ## Example
    ```python
    import torch
    from transformers import AutoModel

    class Classifier(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(name)
            self.encoder.requires_grad_(False)
            self.head = torch.nn.Linear(768, 2)

        def forward(self, ids):
            return self.head(self.encoder(ids).last_hidden_state[:, 0])
    ```

    ## Use instead
    ```python
    import torch
    from transformers import AutoModel

    class Classifier(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(name)
            self.encoder.requires_grad_(False)
            self.head = torch.nn.Linear(768, 2)

        def train(self, mode=True):
            super().train(mode)
            self.encoder.eval()
            return self

        def forward(self, ids):
            return self.head(self.encoder(ids).last_hidden_state[:, 0])
    ```

    ## References
    - PyTorch docs, `Module.train`:
      https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.train
    """
    if "requires_grad" not in facts.source:
        return
    imports = facts.imports
    for cls in (n for n in ast.walk(facts.tree) if isinstance(n, ast.ClassDef)):
        loaded: dict[str, bool] = {}  # attribute -> proven pretrained (else: built by a call)
        for function in cls.body:
            if isinstance(function, Function) and function.name == "__init__":
                for sub in ast.walk(function):
                    if not isinstance(sub, ast.Assign):
                        continue
                    sure = _is_pretrained_load(sub.value)
                    if not sure and not _built_elsewhere(sub.value, imports):
                        continue
                    for target in sub.targets:
                        for name in target_names(target):
                            if name.startswith("self.") and not loaded.get(name):
                                loaded[name] = sure
        if not loaded:
            continue
        for name, where in _frozen_targets(cls).items():
            if name not in loaded or _keeps_eval(cls, name):
                continue
            message = (
                f"`{name}` is frozen but never kept in eval mode: the parent's `train()` "
                f"turns its dropout and BatchNorm updates back on (override `train()` to call "
                f"`{name}.eval()`)"
            )
            if loaded[name]:
                yield where, message, None
            else:
                yield where, message, None, LOW


@rule(
    "GF310",
    "pretrained-trained-in-eval",
    "a `from_pretrained` model comes back in eval mode and is trained without `.train()`",
)
def pretrained_trained_in_eval(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports a model loaded with `X.from_pretrained(...)` whose parameters are handed to
    an optimiser, when nothing puts it (or a module built from it) in train mode:
    no `.train()` on it in the function, in the functions of this file it is given to,
    or in the methods of the class that holds it.

    ## Evidence
    The model comes from `from_pretrained` (tokenizers, configs and
    processors excluded), its `parameters()` reach an optimiser in the same function, and
    it is never given to a function the analysis cannot see (which may set the mode) nor
    returned to the caller. Confidence: high.

    ## Why is this a problem?
    Hugging Face `from_pretrained` returns the model in **eval mode**. A hand-written
    fine-tuning loop that never calls `model.train()` trains with every dropout layer
    switched off: it runs, the loss goes down, and the fine-tuned model is worse than
    it should be (it over-fits faster), with nothing to warn about it.

    **Hidden detail.** The `Trainer` class calls `model.train()` for you, so code
    ported from a `Trainer` script to a custom loop loses the call without noticing.

    ## Example
    ```python
    import torch
    from transformers import AutoModelForSequenceClassification

    def finetune(loader):
        model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    ```

    ## Use instead
    ```python
    import torch
    from transformers import AutoModelForSequenceClassification

    def finetune(loader):
        model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        model.train()
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    ```

    ## References
    - Hugging Face docs, `PreTrainedModel.from_pretrained` ("The model is set in
      evaluation mode by default using `model.eval()`"):
      https://huggingface.co/docs/transformers/main_classes/model
    """
    if "from_pretrained" not in facts.source:
        return
    tree = facts.tree
    imports = facts.imports
    callees = local_callees(tree)
    classes = {function: cls for function, cls in functions(tree) if cls is not None}
    for function, cls in functions(tree):
        for stmt in local_nodes(function):
            if not isinstance(stmt, ast.Assign) or not _is_from_pretrained(stmt.value):
                continue
            names = [n for t in stmt.targets for n in target_names(t)]
            if len(names) != 1:
                continue
            name = names[0]
            scope: list[ast.AST] = [function]
            if name.startswith("self.") and cls is not None:
                scope = [f for f, c in classes.items() if c is cls]
            aliases = _aliases(function, name)
            optimised = _optimised(function, aliases, imports)
            if optimised is None:
                continue
            if any(_trains(node, aliases) for node in scope):
                continue
            if _escapes(function, aliases, callees, imports):
                continue
            yield (
                optimised,
                f"`{name}` comes from `from_pretrained` in eval mode and is trained without "
                f"`{name}.train()`: dropout stays off for all of training",
                None,
            )


def _aliases(function: ast.AST, name: str) -> set[str]:
    """``name`` and the names bound to it (``net = model.to(device)``, ``DataParallel``)."""
    found = {name}
    changed = True
    while changed:
        changed = False
        for sub in local_nodes(function):
            if isinstance(sub, ast.Assign):
                source = module_of(sub.value)
                wrapped = (
                    isinstance(sub.value, ast.Call)
                    and sub.value.args
                    and (dotted(sub.value.func) or "").rsplit(".", 1)[-1]
                    in {"DataParallel", "DistributedDataParallel", "DDP", "compile"}
                    and module_of(sub.value.args[0]) in found
                )
                if source in found or wrapped:
                    for target in sub.targets:
                        for bound in target_names(target):
                            if bound not in found:
                                found.add(bound)
                                changed = True
    return found


def _optimised(function: ast.AST, aliases: set[str], imports: ImportMap) -> ast.AST | None:
    for sub in local_nodes(function):
        if isinstance(sub, ast.Call) and constructs_optimiser(sub, imports):
            for arg in [*sub.args[:1], *(k.value for k in sub.keywords if k.arg == "params")]:
                owner = parameters_of(arg)
                if owner in aliases:
                    return sub
    return None


def _trains(node: ast.AST, aliases: set[str]) -> bool:
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr == "train"
            and (not sub.args or not is_false(sub.args[0]))
        ):
            owner = module_of(sub.func.value)
            if owner in aliases or (owner and owner.split(".")[0] in aliases):
                return True
    return False


_PASSIVE = re.compile(
    r"(^|\.)(to|cuda|cpu|parameters|named_parameters|state_dict|save_pretrained|"
    r"resize_token_embeddings|print|len|isinstance|getattr|hasattr|DataParallel|"
    r"DistributedDataParallel|DDP|compile|prepare_model_for_kbit_training)$"
)


def _escapes(
    function: ast.AST, aliases: set[str], callees: dict[str, ast.AST], imports: ImportMap
) -> bool:
    """The model is given to a function that may set its mode: one this file defines
    and that calls ``.train()`` on its parameter, or one the analysis cannot see."""
    for sub in local_nodes(function):
        if isinstance(sub, ast.Return | ast.Yield) and sub.value is not None:
            if names_read(sub.value) & aliases:
                return True  # the caller trains it, and may set its mode
            continue
        if not isinstance(sub, ast.Call):
            continue
        given = [a for a in [*sub.args, *(k.value for k in sub.keywords)] if dotted(a) in aliases]
        if not given:
            continue
        name = dotted(sub.func) or ""
        if _PASSIVE.search(name) or constructs_optimiser(sub, imports):
            continue
        callee = callees.get(name)
        if callee is None:
            return True  # something unseen receives the model
        if isinstance(callee, Function) and any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "train"
            for n in ast.walk(callee)
        ):
            return True
    return False
