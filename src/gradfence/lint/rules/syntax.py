"""GF000: the file does not parse (reported by the engine, documented here)."""

from __future__ import annotations

from collections.abc import Iterator

from gradfence.lint.model import FileModel
from gradfence.lint.rules.registry import Hit, rule

SYNTAX_ERROR = "GF000"


@rule(SYNTAX_ERROR, "syntax-error", "the file does not parse; no other rule can check it")
def syntax_error(facts: FileModel) -> Iterator[Hit]:
    """
    ## What it does
    Reports a file that Python's parser rejects, with the parser's own message, at the
    position the parser gives.

    ## Evidence
    The parser's error. Confidence: high.

    ## Why is this a problem?
    A file that does not parse cannot be checked by any other rule, so its grad-mode bugs
    would go unreported. The linter says so instead of skipping the file silently, and it
    never stops with a traceback: the rest of the tree is still checked.

    **Hidden detail.** The linter parses with the Python that runs it: code using syntax
    newer than that interpreter (for example `except*` on Python 3.10) is reported here
    even though a newer Python accepts it. Run the linter with the Python your project
    targets.

    ## Example
    ```python
    import torch

    with torch.no_grad()
        y = model(x)
    ```
    is reported as `3:21 GF000 expected ':'` (the message is the parser's).

    ## Use instead
    ```python
    import torch

    with torch.no_grad():
        y = model(x)
    ```

    ## References
    - Python docs, `ast.parse`: https://docs.python.org/3/library/ast.html#ast.parse
    """
    # The engine reports GF000 while parsing; a parsed file has nothing more to say here.
    return iter(())
