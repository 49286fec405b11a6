"""Optional dependencies, imported lazily with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

# module → (extra, pip name)
EXTRAS = {
    "open_clip": ("clip", "open_clip_torch"),
    "triton": ("gpu", "triton"),
    "mamba_ssm": ("gpu", "mamba-ssm"),
    "selective_scan_cuda": ("gpu", "mamba-ssm"),
    "faiss": ("faiss", "faiss-cpu"),
    "matplotlib": ("report", "matplotlib"),
    "datasets": ("data", "datasets"),
    "safetensors": ("data", "safetensors"),
    "torchvision": ("prepare", "torchvision"),
    "PIL": ("prepare", "pillow"),
}


class MissingDependencyError(ImportError):
    """An optional package needed for the requested feature is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]  # a submodule (safetensors.torch) needs its package's extra
        extra, package = EXTRAS.get(module) or EXTRAS.get(top, (None, top))
        how = f"pip install 'dmmh[{extra}]'" if extra else f"pip install {package}"
        raise MissingDependencyError(f"{feature} needs the optional package {package!r}: {how} ({exc})") from exc


def available(module: str) -> bool:
    """Whether ``module`` imports (without raising)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require_all(modules: Iterable[str], feature: str) -> list[ModuleType]:
    """Import every module in ``modules``, or raise one :class:`MissingDependencyError` naming every missing
    package and one ``pip install 'dmmh[extra,...]'`` for all of them. Call it before the work starts."""
    found, missing = [], {}
    for module in dict.fromkeys(modules):
        try:
            found.append(importlib.import_module(module))
        except ImportError:
            top = module.partition(".")[0]
            missing[module] = EXTRAS.get(module) or EXTRAS.get(top) or (None, top)
    if not missing:
        return found
    extras = sorted({extra for extra, _ in missing.values() if extra})
    plain = sorted({package for extra, package in missing.values() if not extra})
    how = ([f"pip install 'dmmh[{','.join(extras)}]'"] if extras else []) + ([f"pip install {' '.join(plain)}"] if plain else [])
    packages = ", ".join(sorted({repr(package) for _, package in missing.values()}))
    raise MissingDependencyError(f"{feature}: missing optional package(s) {packages}; install with {' and '.join(how)}")
