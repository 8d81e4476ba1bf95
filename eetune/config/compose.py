"""Compose a stage's config: recipe + `configs/` groups + command-line overrides (Hydra).

A recipe is a primary Hydra config (`recipes/<name>.yaml`, or any YAML path a user
copied) whose defaults list starts with the typed schema and picks groups from `configs/`.
Every failure a user can cause becomes a one-line `EetuneError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Iterable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eetune.config.schema import EetuneConfig, register_schema
from eetune.errors import EetuneError

# Package data (links to the repository's top-level recipes/ and configs/ in a checkout), so an
# installed wheel finds them too.
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
RECIPES_DIR = _PACKAGE_DIR / "recipes"
CONFIGS_DIR = _PACKAGE_DIR / "configs"
DEFAULT_RECIPE = "base"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def config_groups() -> dict[str, list[str]]:
    """Group name -> its options, e.g. {"model": ["llama2_13b", ...], ...}."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONFIGS_DIR.iterdir())
        if d.is_dir()
    }


def recipe_path(recipe: str) -> Path:
    """A built-in recipe name, or a path to a user's recipe YAML."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe).expanduser().resolve()
        if not path.is_file():
            raise EetuneError(f"recipe file not found: {recipe}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise EetuneError(
            f"unknown recipe '{recipe}'{_did_you_mean(recipe, list_recipes())} "
            f"(available: {', '.join(list_recipes())}; see `eetune recipes list`)"
        )
    return path


def schema_keys(node: Any = EetuneConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included: 'model', 'model.name', ..."""
    keys = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(schema_keys(type(default), prefix=f"{key}."))
    return keys


def compose_config(stage: str, args: Iterable[str]) -> EetuneConfig:
    """`args` are command-line words: `recipe=<name|path>` and Hydra overrides.

    Returns the typed config (an `EetuneConfig` instance), validated, model.dtype=auto resolved."""
    recipe = DEFAULT_RECIPE
    overrides = []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    path = recipe_path(recipe)
    _check_override_keys(overrides)

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            composed = compose(
                config_name=path.stem,
                overrides=[f"hydra.searchpath=[file://{CONFIGS_DIR}]", f"stage={stage}", *overrides],
            )
        OmegaConf.resolve(composed)
        _check_missing(composed)
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as exc:
        raise EetuneError(_explain(exc, recipe)) from None
    finally:
        GlobalHydra.instance().clear()
    cfg.validate()
    if cfg.model.dtype == "auto":
        from eetune.models import native_dtype  # torch: imported only when needed

        cfg.model.dtype = "bfloat16" if stage == "plan" else native_dtype(cfg.model.device)
    return cfg


def validate(cfg: EetuneConfig) -> None:
    """Value checks the schema's types cannot express (each section's `validate()`)."""
    cfg.validate()


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise EetuneError(f"{missing[0]} is required: set it on the command line, e.g. {missing[0]}=...")


def _check_override_keys(overrides: list[str]) -> None:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise EetuneError(f"cannot parse override: {_first_line(exc)}") from None
    known = set(schema_keys())
    groups = config_groups()
    for override in parsed:
        key = override.key_or_group
        if key in groups:
            value = override.value()
            if isinstance(value, str) and value not in groups[key]:
                raise EetuneError(
                    f"unknown {key} config '{value}'{_did_you_mean(value, groups[key])} "
                    f"(available: {', '.join(groups[key])})"
                )
            continue
        if key.startswith("hydra.") or key in known:
            continue
        raise EetuneError(f"unknown key '{key}'{_did_you_mean(key, sorted(known))}")


def _did_you_mean(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" — did you mean '{match[0]}'?" if match else ""


def _explain(exc: BaseException, recipe: str) -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line that names the key."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(messages)
    full_key = re.search(r"full_key: (\S+)", text)
    missing_key = re.search(r"Key '([^']+)' not in '", text)
    if missing_key and full_key:
        key = full_key.group(1)
        return f"unknown key '{key}' in recipe '{recipe}'{_did_you_mean(key, schema_keys())}"
    if "could not be converted" in text or "Value '" in text:
        detail = next(line for line in text.splitlines() if "Value '" in line or "could not" in line)
        where = f" for {full_key.group(1)}" if full_key else ""
        return f"invalid value{where}: {detail.strip()}"
    return _first_line(text)


def _first_line(exc: Any) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
