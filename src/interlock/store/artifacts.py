"""Content-addressed artifact blobs on a local (or shared) filesystem.

An artifact is stored once per content and file name, at
``<root>/sha256/<sha[:2]>/<sha>/<original file name>``: the name is kept because model
formats read it (the ``python`` format needs ``.py``). Writes go to a temporary file in
``<root>/tmp`` and are renamed into place, so a reader never sees a partial file and
two processes storing the same bytes at once both succeed.

Every method blocks; async callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from interlock.errors import ArtifactIntegrityError, StoreError

__all__ = ["ArtifactStore", "StoredArtifact"]

_CHUNK_BYTES: Final = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """Where :meth:`ArtifactStore.put` left a file, and the sha256 of its bytes."""

    sha256: str
    path: Path


class ArtifactStore:
    """Content-addressed files under ``root``; safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root).expanduser().absolute()

    @property
    def root(self) -> Path:
        return self._root

    def path(self, sha256: str, filename: str) -> Path:
        """Where the artifact with this digest and file name is (or would be) stored."""
        if not _SHA256.fullmatch(sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        if filename in ("", ".", "..") or "/" in filename or "\\" in filename:
            raise StoreError(f"not a plain file name: {filename!r}")
        return self._root / "sha256" / sha256[:2] / sha256 / filename

    def put(self, src: Path) -> StoredArtifact:
        """Copy ``src`` into the store, hashing while copying; a no-op for stored bytes."""
        src = Path(src)
        tmp_dir = self._root / "tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            with src.open("rb") as reader:
                fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
                tmp = Path(tmp_name)
                try:
                    digest = hashlib.sha256()
                    with os.fdopen(fd, "wb") as writer:
                        while chunk := reader.read(_CHUNK_BYTES):
                            digest.update(chunk)
                            writer.write(chunk)
                        writer.flush()
                        os.fsync(writer.fileno())
                    sha256 = digest.hexdigest()
                    final = self.path(sha256, src.name)
                    if final.is_file():
                        return StoredArtifact(sha256, final)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    tmp.chmod(0o644)
                    tmp.replace(final)
                    return StoredArtifact(sha256, final)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
        except FileNotFoundError as exc:
            raise StoreError(f"artifact not found: {src}") from exc
        except IsADirectoryError as exc:
            raise StoreError(f"an artifact is a single file, not a directory: {src}") from exc
        except OSError as exc:
            raise StoreError(f"cannot store {src} in {self._root}: {exc}") from exc

    def verify(self, path: Path, sha256: str) -> None:
        """Re-hash ``path``; raise :class:`ArtifactIntegrityError` unless it is ``sha256``."""
        try:
            actual = _sha256_of(path)
        except FileNotFoundError as exc:
            raise ArtifactIntegrityError(f"artifact missing: {path}") from exc
        except OSError as exc:
            raise ArtifactIntegrityError(f"cannot read artifact {path}: {exc}") from exc
        if actual != sha256:
            raise ArtifactIntegrityError(
                f"artifact {path} has sha256 {actual}, but {sha256} was registered"
            )

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self._root)!r})"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as reader:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
