"""Loading YAML recipes and data specs into frozen pydantic models.

`load_yaml_model` reads a YAML file, applies `--set key=value` overrides (dotted paths, values parsed as YAML),
validates against a pydantic model, and gathers *all* problems into one `ConfigError` that names the file, the
dotted path, the bad value and what is allowed.

Imports only `alm.errors`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from alm.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Parse `key.sub=value` strings into a dotted-path dict; values are parsed as YAML scalars.

    Raises:
        ConfigError: an override without `=` or with an empty key.
    """
    parsed: dict[str, Any] = {}
    problems = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        parsed[key.strip()] = value
    if problems:
        raise ConfigError("\n".join(problems))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of `data` with dotted-path overrides set (intermediate dicts are created).

    A numeric path part indexes into a list: `stores.0.path=...` sets the first store's path.

    Raises:
        ConfigError: a numeric part is out of range for its list.
    """
    out = json.loads(json.dumps(data, default=str))
    for dotted, value in overrides.items():
        node: Any = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {dotted}: {'.'.join(parts[:i]) or 'the recipe'} is a list of {len(node)} "
                        f"item(s); use an index 0..{len(node) - 1} in place of {part!r}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    if not isinstance(node[int(part)], (dict, list)):
                        node[int(part)] = {}
                    node = node[int(part)]
            elif last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return out


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: `source: dotted.path: message (got value)`."""
    lines = [f"{source}: {err.error_count()} problem(s):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        got = e.get("input")
        # a cross-field rule's input is a whole section (or the recipe): its message names the values already
        whole = isinstance(got, dict)
        got_s = "" if e["type"] in ("missing", "extra_forbidden") or whole else f" (got {got!r})"
        lines.append(f"  - {path}: {msg}{got_s}")
    return "\n".join(lines)


def read_yaml(path: str | Path, example: str = "stages/demo_precompute.yaml") -> dict[str, Any]:
    """Read a YAML mapping from `path`.

    Args:
        path: the YAML file.
        example: a file of the same kind, named in the message when `path` is missing.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found. Pass the path of a YAML file, e.g. {example}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping of keys to values at the top level, got {type(data).__name__}"
        )
    return data


def validate_model(model_cls: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    """Validate `data` against `model_cls`, turning every problem into one `ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_yaml_model(
    model_cls: type[ModelT], path: str | Path, overrides: list[str] | None = None
) -> ModelT:
    """Load `path` as `model_cls`, with `--set` overrides applied before validation.

    Raises:
        ConfigError: the file cannot be read or any value is invalid (all problems at once).
    """
    example = getattr(model_cls, "example_file", "stages/demo_precompute.yaml")
    data = apply_overrides(read_yaml(path, example), parse_overrides(overrides))
    return validate_model(model_cls, data, str(path))


def config_hash(model: BaseModel) -> str:
    """Stable short hash of a resolved config (sorted JSON, sha256, 16 hex digits)."""
    blob = json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
