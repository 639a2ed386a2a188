"""Experiment configs: the dataclass schema, YAML loading, argument signatures."""

from distill.config.load import load_config, read_config, to_dict, to_yaml
from distill.config.schema import Config, DataConfig, EdgeConfig, ModelConfig

__all__ = ["Config", "DataConfig", "EdgeConfig", "ModelConfig", "load_config", "read_config", "to_dict", "to_yaml"]
