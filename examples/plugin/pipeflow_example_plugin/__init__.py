"""An example pipeflow plugin: one class-based stage, published through an entry point.

The package's ``pyproject.toml`` declares::

    [project.entry-points."pipeflow.stages"]
    redact = "pipeflow_example_plugin:Redact"
"""

from __future__ import annotations

import re
from typing import Any

from pipeflow import Stage

__all__ = ["Redact"]

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")


class Redact(Stage[str, str]):
    """Mask e-mail addresses and card numbers in text before it is stored or logged.

    ``Redact(mask="[redacted]", workers=2)``: every pipeflow stage option is accepted as
    a keyword (``workers``, ``buffer``, ``errors``, ...), as for any ``Stage``.
    """

    def __init__(self, *, mask: str = "[redacted]", **options: Any) -> None:
        super().__init__(**options)
        self.mask = mask

    async def process(self, item: str) -> str:
        return _CARD.sub(self.mask, _EMAIL.sub(self.mask, item))
