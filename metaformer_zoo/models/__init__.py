"""Zoo model families, one module each. Importing this package registers every zoo model with timm.

Every public module here is imported automatically (modules starting with ``_`` hold shared helpers), so adding a
family is adding its file.
"""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
