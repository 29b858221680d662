"""The lint analysis core: facts the code proves, shared by every rule.

- :mod:`.summary`: per-function summaries (the binder): mode switches, forwards,
  differentiation, optimisers, detaches and stores on canonical targets (module identity
  survives ``.to()``, ``DataParallel``, ``torch.compile``, ``.module``);
- :mod:`.project`: the project root, module names, and summaries cached by content hash;
- :mod:`.effects`: summaries composed along the call graph, within the file and across
  the project's own modules;
- :mod:`.context`: the questions rules ask (what mode is this module in here, is this an
  evaluation, is this module trained), answered from that evidence.
"""
