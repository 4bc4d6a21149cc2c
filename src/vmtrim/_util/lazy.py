"""Package ``__init__`` exports that import their module only when first used.

A package's ``__all__`` is its public API, but importing the package must stay cheap:
``vmtrim image info`` should not pay for lxml, libvirt or rich because the package it
lives in also exports them. :func:`lazy_exports` returns a module ``__getattr__``
(PEP 562) that imports ``name``'s module on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """``__getattr__`` for ``package``: ``where`` maps each exported name to its module."""

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
