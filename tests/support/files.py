"""Files the proxy reads as secrets."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: Path, text: str) -> Path:
    """Write a file the proxy reads as a secret: readable by its owner only, as it requires."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path
