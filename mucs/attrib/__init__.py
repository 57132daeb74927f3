"""Attribution methods: one module each, registered by name (see base.py for the interface)."""
import importlib
import pkgutil

from mucs.attrib.base import REGISTRY, Context, Method, get_method, register  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
