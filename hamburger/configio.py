"""Typed configs: dataclasses + YAML + `key=value` overrides, via omegaconf structured configs.

Unknown keys and wrong types fail with the key's dotted name. The resolved config is what a
run saves beside its outputs, so a run can always be repeated.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TypeVar, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hamburger.choice import Choice  # noqa: F401 - configs import it from here

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` <- YAML file <- dotted `key=value` overrides, type-checked at each step."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    return _build(cls, OmegaConf.structured(cls), path, overrides)


def with_overrides(obj: T, overrides: list[str], where: str = "") -> T:
    """A copy of a loaded config with more `key=value` overrides, checked as load_config checks."""
    return _build(type(obj), OmegaConf.structured(obj), None, overrides, where)


def _build(cls: type[T], merged, path, overrides: list[str] | None, where: str = "") -> T:
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, _load_yaml_mapping(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}{where} is not of the form key=value")
            key = item.split("=", 1)[0]
            _check_plain_value(key, item.split("=", 1)[1])
            merged = _override(merged, key, item, where)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" (in {path})" if path else where
        renamed = _renamed_to(cls, key) if key else None
        if renamed:
            raise ConfigError(f"config key {key!r} was renamed: use {renamed!r}{where}") from None
        raise ConfigError(f"config key {key!r}: {e.msg if hasattr(e, 'msg') else e}{where}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _override(merged, key: str, item: str, where: str):
    """One `key=value` onto the config. A key through a list element (`sources.0.weight=0.2`)
    is set in place: a dotlist merge would replace the whole list with a new one."""
    if not any(part.isdigit() for part in key.split(".")):
        try:
            return OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except TypeError:  # a mapping onto a list: `sources.x.weight=1`
            raise ConfigError(
                f"override {item!r}{where}: a list lies on the way to {key!r}; name one entry by its "
                "index (e.g. sources.0.weight=0.5)"
            ) from None
    value = OmegaConf.from_dotlist(["v=" + item.split("=", 1)[1]])["v"]
    node, parts = merged, key.split(".")
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {item!r}{where}: {'.'.join(parts[:n]) or key!r} has {len(node)} entries, "
                    f"no entry {part!r}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif last:
            node[part] = value  # a structured config checks the key and the type
        else:
            node = node[part]
    return merged


def _renamed_to(cls: type, dotted: str) -> str | None:
    """The new dotted name of a key its dataclass lists in RENAMED (old -> new), else None."""
    *parents, last = str(dotted).split(".")
    current = cls
    for part in parents:
        hints = get_type_hints(current) if is_dataclass(current) else {}
        if part not in {f.name for f in fields(current)} or not is_dataclass(hints.get(part)):
            return None
        current = hints[part]
    new = getattr(current, "RENAMED", {}).get(last)
    return ".".join([*parents, new]) if new else None


def _load_yaml_mapping(path: str | Path):
    """The file's top level must be a mapping of config keys; anything else is named with the file."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else type(loaded).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, but it is {kind}")
    return loaded


def check_range(key: str, value, ok: bool, must: str) -> None:
    """Raise ConfigError naming the key unless `ok`; `must` says what the value must be."""
    if not ok:
        raise ConfigError(f"config key {key!r}: must be {must}, got {value!r}")


def _check_plain_value(key: str, value: str) -> None:
    """Interpolations (${...}) and resolvers are code paths we do not offer on the command line."""
    if "${" in value:
        raise ConfigError(f"override {key}: interpolations are not allowed in overrides ({value!r})")


def to_yaml(obj) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_flat_dict(obj) -> dict[str, object]:
    """{'a.b.c': value} for logging (MLflow params) and cache keys."""
    container = OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)
    flat: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and any(isinstance(x, dict | list) for x in node):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = node

    walk("", container)
    return flat
