"""Typed configuration: stage recipes (`stages/*.yaml`) and data specs (`data_specs/*.yaml`).

Imports only `alm.errors` (and pydantic/yaml).
"""

from alm.config.load import (
    StrictModel,
    apply_overrides,
    config_hash,
    load_yaml_model,
    parse_overrides,
    read_yaml,
    validate_model,
)

__all__ = [
    "StrictModel",
    "apply_overrides",
    "config_hash",
    "load_yaml_model",
    "parse_overrides",
    "read_yaml",
    "validate_model",
]
