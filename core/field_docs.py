"""A config dataclass's own comments, as the help text of the flag of each field.

The comments beside and above each field are where its meaning is written down once; the
command line shows them instead of a second, drifting copy.
"""

from __future__ import annotations

import inspect
import re

_FIELD = re.compile(r"^    (\w+)\s*:\s*[^=]+?(?:=.*?)?$")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment}: the block of comment lines right above the field, then
    the one beside it (after '  # ', the inline-comment convention)."""
    found: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and line.startswith("    ") and not line.startswith("     "):
            above.append(stripped.lstrip("#").strip())
            continue
        code, _, beside = line.partition("  # ")
        match = _FIELD.match(code.rstrip())
        if match and not stripped.startswith(("def ", "@", "return")):
            text = " ".join([*above, beside.strip()]).strip()
            if text:
                found[match.group(1)] = text
        above = []
    return found
