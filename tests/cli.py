"""Running the console script as a user would: a separate process, a plain environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def derive(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, columns: int = 160
) -> subprocess.CompletedProcess[str]:
    """``derive ARGS`` in its own process; output captured as text, never raises on failure.

    ``env`` adds variables to the plain environment (PATH, COLUMNS, NO_COLOR).
    """
    return subprocess.run(
        [sys.executable, "-m", "derive.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "COLUMNS": str(columns),
            "NO_COLOR": "1",
            **(env or {}),
        },
    )
