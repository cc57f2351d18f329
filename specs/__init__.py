"""JSON Schemas of API bodies and manifest kinds, and validation that names every field.

The API (`api/base.py`) and `nanod apply` validate with the same schemas, so a body the
API refuses is refused by a manifest check too, with the same words.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

HERE = Path(__file__).parent


@functools.cache
def _documents() -> dict[str, dict]:
    """All schema definitions, keyed by name, from every specs/api/*.json file."""
    out: dict[str, dict] = {}
    for path in sorted((HERE / "api").glob("*.json")):
        for name, schema in json.loads(path.read_text()).items():
            if name in out:
                raise ValueError(f"schema {name!r} defined twice (second in {path.name})")
            out[name] = schema
    return out


def schema(name: str) -> dict:
    try:
        return _documents()[name]
    except KeyError:
        raise KeyError(f"no schema named {name!r} in specs/api") from None


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    sch = schema(name)
    cls = jsonschema.validators.validator_for(sch)
    cls.check_schema(sch)
    return cls(sch)


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(body)"


def _say(error: jsonschema.ValidationError) -> str:
    """One sentence per problem, naming the field and what would be right."""
    where = _where(error)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        prefix = "" if where == "(body)" else where + "."
        return f"{prefix}{missing}: is required"
    if error.validator == "additionalProperties":
        return f"{where}: {error.message}"
    if error.validator == "type":
        return f"{where}: must be of type {error.validator_value}, got {type(error.instance).__name__}"
    if error.validator == "enum":
        options = ", ".join(repr(v) for v in error.validator_value)
        return f"{where}: {error.instance!r} is not one of {options}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum"):
        return f"{where}: {error.message}"
    if error.validator == "pattern":
        hint = error.schema.get("description", f"must match {error.validator_value}")
        return f"{where}: {error.instance!r} is invalid: {hint}"
    return f"{where}: {error.message}"


def validate(name: str, body: Any) -> list[str]:
    """Every problem of `body` against schema `name`, as sentences; [] when valid."""
    errors = sorted(_validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    return [_say(e) for e in errors]
