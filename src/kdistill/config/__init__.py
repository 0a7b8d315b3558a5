"""Run configs: pydantic schema, YAML with safe_load, dotted key=value overrides."""

from kdistill.config.loader import ConfigError, apply_overrides, dump_config, load_config, parse_overrides
from kdistill.config.schema import (
    DataConfig,
    DistillConfig,
    MatchConfig,
    RunConfig,
    StageConfig,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
)

__all__ = ["ConfigError", "DataConfig", "DistillConfig", "MatchConfig", "RunConfig", "StageConfig",
           "StudentConfig", "TeacherConfig", "TrainingConfig", "apply_overrides", "dump_config", "load_config",
           "parse_overrides"]  # fmt: skip
