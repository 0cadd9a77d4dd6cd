"""What every part of the verl integration shares: the supported verl versions, the check that the installed verl is
one of them, the prefix of our registered names, and reading a key from any of verl's config types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["NAME_PREFIX", "SUPPORTED_VERL", "check_verl_version", "config_get"]

SUPPORTED_VERL = ">=0.9.1,<0.10"
NAME_PREFIX = "rlvr_fast"


def check_verl_version(version: str | None = None) -> str:
    """The installed verl version, or ImportError naming it when it is outside ``SUPPORTED_VERL``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        try:
            import verl
        except ImportError as exc:
            raise ImportError(
                f"rlvr_fast.integrations.verl.register() needs verl{SUPPORTED_VERL}: pip install --no-deps "
                f"verl==0.9.1 && pip install -r requirements-verl.txt (or a full pip install verl==0.9.1)"
            ) from exc
        version = verl.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_VERL)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(
            f"rlvr_fast's verl integration supports verl{SUPPORTED_VERL} (tested with 0.9.1), found verl {version}: "
            f"it registers into verl.trainer.ppo.core_algos and replaces verl.utils.kernel.linear_cross_entropy, "
            f"whose signatures change between releases. Install a supported version."
        )
    return version


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's configs (OmegaConf DictConfig, verl's BaseConfig dataclasses) and plain mappings."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError):  # a dataclass config without the field
            return default
    return getattr(config, key, default)
