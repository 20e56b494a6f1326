"""Content-addressed artifacts: layout, deduplication and integrity checks."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from interlock.errors import ArtifactIntegrityError, StoreError
from interlock.store import ArtifactStore, StoredArtifact


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_stores_by_content(store: ArtifactStore, tmp_path: Path) -> None:
    data = b"weights" * 100_000  # several read chunks
    sha = hashlib.sha256(data).hexdigest()

    stored = store.put(_write(tmp_path / "in" / "model.onnx", data))

    expected = store.root / "sha256" / sha[:2] / sha / "model.onnx"
    assert stored == StoredArtifact(sha256=sha, path=expected)
    assert expected.read_bytes() == data
    assert store.path(sha, "model.onnx") == expected
    assert expected.is_absolute()
    assert list((store.root / "tmp").iterdir()) == []


def test_same_bytes_twice_is_a_no_op(store: ArtifactStore, tmp_path: Path) -> None:
    first = store.put(_write(tmp_path / "a" / "model.py", b"x = 1\n"))
    mtime = first.path.stat().st_mtime_ns
    second = store.put(_write(tmp_path / "b" / "model.py", b"x = 1\n"))

    assert second == first
    assert first.path.stat().st_mtime_ns == mtime
    assert [p.name for p in first.path.parent.iterdir()] == ["model.py"]
    assert list((store.root / "tmp").iterdir()) == []


def test_different_bytes_or_names_are_kept_apart(store: ArtifactStore, tmp_path: Path) -> None:
    one = store.put(_write(tmp_path / "1" / "model.py", b"one"))
    two = store.put(_write(tmp_path / "2" / "model.py", b"two"))
    renamed = store.put(_write(tmp_path / "3" / "other.py", b"one"))

    assert len({one.path, two.path, renamed.path}) == 3
    assert renamed.sha256 == one.sha256
    assert renamed.path.parent == one.path.parent


async def test_concurrent_puts_of_the_same_bytes(store: ArtifactStore, tmp_path: Path) -> None:
    sources = [_write(tmp_path / str(i) / "m.bin", b"same" * 1000) for i in range(8)]
    stored = await asyncio.gather(*(asyncio.to_thread(store.put, s) for s in sources))
    assert len(set(stored)) == 1
    assert stored[0].path.read_bytes() == b"same" * 1000


def test_verify_accepts_untouched_and_detects_tampering(
    store: ArtifactStore, tmp_path: Path
) -> None:
    stored = store.put(_write(tmp_path / "model.txt", b"trees"))
    store.verify(stored.path, stored.sha256)

    stored.path.write_bytes(b"trees, edited")
    with pytest.raises(ArtifactIntegrityError) as caught:
        store.verify(stored.path, stored.sha256)
    actual = hashlib.sha256(b"trees, edited").hexdigest()
    assert str(caught.value) == (
        f"artifact {stored.path} has sha256 {actual}, but {stored.sha256} was registered"
    )
    assert not caught.value.retryable


def test_verify_detects_a_missing_file(store: ArtifactStore, tmp_path: Path) -> None:
    stored = store.put(_write(tmp_path / "model.txt", b"trees"))
    stored.path.unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"^artifact missing: "):
        store.verify(stored.path, stored.sha256)


def test_put_errors(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^artifact not found: "):
        store.put(tmp_path / "absent.bin")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreError, match=r"^an artifact is a single file, not a directory"):
        store.put(tmp_path / "folder")


@pytest.mark.parametrize(
    ("sha", "name"),
    [("../../etc", "passwd"), ("A" * 64, "x"), ("a" * 64, ".."), ("a" * 64, "a/b"), ("a" * 64, "")],
)
def test_path_refuses_what_could_escape_the_root(store: ArtifactStore, sha: str, name: str) -> None:
    with pytest.raises(StoreError):
        store.path(sha, name)
