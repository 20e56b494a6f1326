"""A model library's error as one line a user can read.

Libraries put more in their messages than a user should see: native log prefixes
(``[LightGBM] [Fatal]``, ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :``), the C++ source
line that raised (``[04:50:55] /workspace/src/common/json.cc:409:``), stack traces, and
the absolute path of the file, which at registration is a private path inside the
artifact store. :func:`library_message` keeps the first line of what went wrong, with
file paths cut to their names; the full exception stays chained (``raise ... from exc``)
for the log.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["library_message"]

_PREFIXES = (
    re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: "),  # XGBoost: time and C++ source line
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"\[LightGBM\] \[\w+\] "),
)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)")


def library_message(exc: BaseException, path: Path | None = None) -> str:
    """One line: no native prefixes, stack traces, or directories of file paths."""
    text = str(exc).split("Stack trace:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    for prefix in _PREFIXES:
        line = prefix.sub("", line)
    if path is not None:
        line = line.replace(str(path), path.name)
    line = _ABSOLUTE_PATH.sub(r"\1", line).strip().rstrip(":").strip()
    return line or type(exc).__name__
