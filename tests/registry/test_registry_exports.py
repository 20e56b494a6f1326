"""The public names of the registry and store packages are exactly their ``__all__``."""

from __future__ import annotations

import types

import pytest

import interlock.registry
import interlock.store


@pytest.mark.parametrize("package", [interlock.registry, interlock.store])
def test_all_lists_the_public_names(package: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(package.__all__) == public
