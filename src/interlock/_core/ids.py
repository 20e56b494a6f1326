"""Identifiers."""

from __future__ import annotations

import os

__all__ = ["new_request_id"]


def new_request_id() -> str:
    """A short random id for a request: 16 hex characters."""
    return os.urandom(8).hex()
