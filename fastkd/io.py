"""Small file helpers shared by every stage: outputs appear complete or not at all; JSON inputs with clear
errors; file checksums for provenance."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from fastkd.errors import FastkdError


def read_json(path: str | Path, what: str, hint: str):
    """A JSON input, or a clear error naming it (``what``) and how it is made (``hint``)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FastkdError(f"{what} {path} does not exist ({hint})") from None
    except ValueError as e:
        raise FastkdError(f"{what} {path} is not valid JSON ({e}); {hint}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def package_version(name: str) -> str:
    """Installed version of a distribution (recorded in manifests for provenance)."""
    from importlib.metadata import version

    return version(name)


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
