"""Loading a recipe: YAML files composed through ``defaults`` lists, then ``key=value`` overrides, checked
against the schema (``schema.py``) and the value ranges (``checks.py``) before anything starts. Every error
names the key and where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from biodino.config.schema import ConfigError, TrainConfig
from biodino.config.checks import check_ranges
from biodino.config.resources import configs_dir



def find_recipe(spec: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (``demo``, ``bio_dino/schedule``), found from any
    directory."""
    shipped = configs_dir()
    for candidate in (Path(spec), shipped / spec, shipped / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe not found: {spec}")


def read_yaml(path: Path) -> Any:
    """A YAML document; a file that is not text or not YAML is a ConfigError naming it (and the line)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is YAML)") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], Path]]:
    """The YAML documents to merge, defaults first (depth first), each with its file."""
    if path in seen:
        raise ConfigError(f"{path}: defaults form a cycle through {' -> '.join(map(str, seen))}")
    doc = read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(doc).__name__}")
    layers: list[tuple[dict[str, Any], Path]] = []
    for name in doc.pop("defaults", []) or []:
        base = path.parent / f"{name}.yaml"
        if not base.is_file():
            base = configs_dir() / f"{name}.yaml"
        if not base.is_file():
            raise ConfigError(f"{path}: defaults entry {name!r} not found next to it or among the shipped recipes "
                              f"({configs_dir()})")
        layers += _layers(base, (*seen, path))
    return layers + [(upgrade(doc), path)]


# Keys of earlier biodino versions and where they live now, so configs stored in run directories and checkpoints
# (and older recipes) still load.
MOVED_KEYS = {("objective", "nesting_levels"): ("objective", "franca", "nesting_levels"),
              ("objective", "sinkhorn_queue_size"): ("objective", "franca", "sinkhorn_queue_size")}


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with moved keys under their current names (a copy when anything moved)."""
    moved = [(old, new) for old, new in MOVED_KEYS.items() if old[-1] in (doc.get(old[0]) or {})]
    if not moved:
        return doc
    doc = {**doc, "objective": dict(doc["objective"])}
    for (section, key), (_, sub, new_key) in moved:
        value = doc[section].pop(key)
        doc[section][sub] = {**(doc[section].get(sub) or {}), new_key: value}
    return doc


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: {key}: {reason}") from None


def load_config(recipe: str, overrides: list[str] = ()) -> TrainConfig:
    """The resolved, schema-checked config of ``recipe`` with ``key=value`` ``overrides`` applied last."""
    merged = OmegaConf.structured(TrainConfig)
    for layer, path in _layers(find_recipe(recipe)):
        merged = _merge(merged, layer, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not key=value")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {str(err).splitlines()[0]}") from None
    merged = _merge(merged, dotlist, "command line")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required value: {', '.join(missing)}")
    cfg = OmegaConf.to_object(merged)
    check_ranges(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into the run directory and every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(values: dict[str, Any], source: str) -> TrainConfig:
    """A config stored in a checkpoint or file metadata, checked against today's schema."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(TrainConfig), upgrade(values), source))
