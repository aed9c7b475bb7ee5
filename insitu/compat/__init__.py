"""Compatibility layers that run code written for other in-situ frameworks on insitu.

:mod:`insitu.compat.deisa` offers the public API of deisa-ray 0.1.x (``Bridge``,
``Deisa``, ``Window``) on top of :class:`insitu.Bridge` and :class:`insitu.Analytics`:
a deisa-ray simulation and its analytics run on insitu by changing only their imports
(see ``docs/migrating-from-deisa.md``). Nothing is imported here: import the submodule.
"""

from __future__ import annotations

__all__: list[str] = []
