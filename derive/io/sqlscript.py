"""Split a SQL script into statements (ADBC executes one statement per call)."""

from __future__ import annotations

import re

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(script: str) -> list[str]:
    """Split on top-level semicolons, respecting quotes, dollar quotes and comments.

    Args:
        script: SQL text holding any number of statements.

    Returns:
        The non-empty statements, without their trailing semicolons.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if script.startswith("--", i):
            end = script.find("\n", i)
            i = n if end < 0 else end + 1
            buf.append("\n")
            continue
        if script.startswith("/*", i):
            end = script.find("*/", i + 2)
            i = n if end < 0 else end + 2
            buf.append(" ")
            continue
        if ch in ("'", '"'):
            j = i + 1
            while j < n:
                if script[j] == ch:
                    if j + 1 < n and script[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(script[i : j + 1])
            i = j + 1
            continue
        if ch == "$":
            m = _DOLLAR.match(script, i)
            if m:
                tag = m.group(0)
                end = script.find(tag, m.end())
                end = n if end < 0 else end + len(tag)
                buf.append(script[i:end])
                i = end
                continue
        if ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out
