"""Infrastructure for metadata and artifacts.

- :class:`Database`: the SQL metadata database (SQLite or PostgreSQL) with its
  Alembic migrations; its tables are in :mod:`interlock.store.tables`.
- :class:`ArtifactStore`: content-addressed artifact files.
"""

from interlock.store.artifacts import ArtifactStore, StoredArtifact
from interlock.store.db import Database

__all__ = ["ArtifactStore", "Database", "StoredArtifact"]
