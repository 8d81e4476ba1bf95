"""Typed config schema and Hydra composition of recipes, groups and overrides."""

from eetune.config.compose import compose_config, config_groups, list_recipes, recipe_path, validate
from eetune.config.schema import EetuneConfig

__all__ = ["EetuneConfig", "compose_config", "config_groups", "list_recipes", "recipe_path", "validate"]
