"""Recipes: the schema (schema.py), loading with overrides (load.py) and validation (validate.py).
Modules of the training core import `megatron_power.config.schema`, which needs nothing of them."""

from megatron_power.config.load import load_config, load_yaml, omegaconf_message, recipe_path, shrink
from megatron_power.config.schema import (
    DEFAULT_DATA_DIR,
    FINISHED,
    NAME_PATTERN,
    RECIPES_DIR,
    TOKEN_FIELDS,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    MupConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
    as_name,
    format_count,
    from_yaml,
    model_vocab_size,
    parse_blend,
    parse_count,
    setting_changes,
    to_yaml,
    world_size_from_env,
)
from megatron_power.config.validate import validate

__all__ = [
    "DEFAULT_DATA_DIR", "FINISHED", "NAME_PATTERN", "RECIPES_DIR", "TOKEN_FIELDS", "CheckpointConfig", "Config", "DataConfig",
    "ModelConfig", "MupConfig", "OptimizerConfig", "ParallelConfig", "PrecisionConfig", "ScheduleConfig",
    "TrainConfig", "as_name", "format_count", "from_yaml", "load_config", "load_yaml", "model_vocab_size", "omegaconf_message", "parse_blend",
    "parse_count", "recipe_path", "setting_changes", "shrink", "to_yaml", "validate", "world_size_from_env",
]
