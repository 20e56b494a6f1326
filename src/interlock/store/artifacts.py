"""Content-addressed artifact blobs on a local (or shared) filesystem.

An artifact is stored once per content and file name, at
``<root>/sha256/<sha[:2]>/<sha>/<original file name>``: the name is kept because model
formats read it (the ``python`` format needs ``.py``). Writes go to a private staging
directory in ``<root>/tmp`` and are renamed into place, so a reader never sees a partial
file and two processes storing the same bytes at once both succeed. The registry checks
the staged copy before committing it, so a refused artifact leaves no file behind.

Every method blocks; async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
        staged = self.stage(src)
        try:
            return self.commit(staged)
        finally:
            self.discard(staged)

    def stage(self, src: Path) -> StoredArtifact:
        """Copy ``src`` into a private directory under ``<root>/tmp``, hashing while copying.

        The copy keeps its file name. :meth:`commit` moves it into the store and
        :meth:`discard` removes what is left: a caller that checks the copy first and
        fails leaves nothing behind.
        """
        src = Path(src)
        tmp_root = self._root / "tmp"
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=tmp_root, prefix="stage-"))
        except OSError as exc:
            raise StoreError(f"cannot write to the artifact store: {exc.strerror}") from exc
        target = folder / (src.name or "artifact")
        try:
            with src.open("rb") as reader, target.open("wb") as writer:
                digest = hashlib.sha256()
                while chunk := reader.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            target.chmod(0o644)
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, FileNotFoundError):
                raise StoreError(f"artifact not found: {src}") from exc
            if isinstance(exc, IsADirectoryError):
                raise StoreError(f"an artifact is a single file, not a directory: {src}") from exc
            if isinstance(exc, OSError):
                raise StoreError(f"cannot store {src.name}: {exc.strerror}") from exc
            raise
        return StoredArtifact(digest.hexdigest(), target)

    def commit(self, staged: StoredArtifact) -> StoredArtifact:
        """Move a staged file to its place in the store (kept when already there)."""
        final = self.path(staged.sha256, staged.path.name)
        try:
            if not final.is_file():
                final.parent.mkdir(parents=True, exist_ok=True)
                staged.path.replace(final)
        except OSError as exc:
            raise StoreError(f"cannot store {final.name}: {exc.strerror}") from exc
        return StoredArtifact(staged.sha256, final)

    def discard(self, staged: StoredArtifact) -> None:
        """Remove a staged file and its private directory, whether committed or not."""
        folder = staged.path.parent
        if folder.parent == self._root / "tmp":
            shutil.rmtree(folder, ignore_errors=True)

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
