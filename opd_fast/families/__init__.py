"""The registry of model families: every module of this package but `base` is one family and exposes `FAMILY` (an
opd_fast.families.base.Family). A new family is a new module here, with its presets: nothing to list.

The run's builder looks its family up once, `get_family(cfg.model.family)`, and hands the object on; nothing else
compares family names.
"""

from __future__ import annotations

import importlib
import pkgutil

from opd_fast.config import ConfigError
from opd_fast.families.base import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        family = importlib.import_module(f"{__name__}.{module.name}").FAMILY
        if family.name in found:
            raise RuntimeError(f"opd_fast.families.{module.name}: family {family.name!r} is already registered")
        found[family.name] = family
    return dict(sorted(found.items()))


def _presets(families: dict[str, Family]) -> dict[str, Family]:
    found: dict[str, Family] = {}
    for family in families.values():
        for preset in family.presets:
            if preset in found:
                raise RuntimeError(f"preset {preset!r} of family {family.name!r} is also one of {found[preset].name!r}")
            found[preset] = family
    return found


FAMILIES: dict[str, Family] = _discover()  # name -> family, sorted by name
PRESETS: dict[str, Family] = _presets(FAMILIES)  # preset name -> its family


def get_family(name: str) -> Family:
    """The family `model.family` names; an unknown name is a ConfigError naming the key."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family: unknown family {name!r} (known: {', '.join(FAMILIES)})") from None


def model_family(model) -> Family:
    """The family of a run's `model` config section, with its preset checked (a ConfigError names the key): before
    anything loads."""
    family = get_family(model.family)
    if model.path is None and model.preset not in family.presets:
        raise ConfigError(
            f"model.preset: {model.preset!r} is not a preset of model.family {family.name!r} "
            f"(its presets: {', '.join(family.presets)})"
        )
    family.check_model(model)  # a pipeline folder in a layout the family cannot train yet (Wan 2.2's two experts)
    return family


def family_for_run(cfg) -> Family:
    """The family of a run config, checked (model_family) and set up by its sampling section (a video's length)."""
    return model_family(cfg.model).for_run(cfg.sampling)


def preset_arch(preset: str, layers: int | None = None) -> tuple[Family, dict]:
    """A preset's family and constructor arguments. `layers` keeps the widths and the first `layers` blocks (the
    family's cut_blocks says which): the benchmarks' way to run the released widths on a CPU."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    family = PRESETS[preset]
    kwargs = family.presets[preset]
    return family, kwargs if layers is None else family.cut_blocks(kwargs, layers)


__all__ = ["FAMILIES", "PRESETS", "Family", "family_for_run", "get_family", "model_family", "preset_arch"]
