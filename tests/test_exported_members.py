"""Every public module declares ``__all__``, and it names exactly its public definitions."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import interlock


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(interlock.__path__, "interlock."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts[1:]) or "migrations" in parts:
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("name", _public_modules())
def test_all_lists_the_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    if name.endswith("__main__"):
        return
    exported = getattr(module, "__all__", None)
    defined = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    }
    if exported is None:
        assert not defined, f"{name} defines {sorted(defined)} but has no __all__"
        return
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    assert defined <= set(exported), f"{name} does not export {sorted(defined - set(exported))}"
