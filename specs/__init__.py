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
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

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


KIND_REF_PREFIX = "urn:nano:api:"
"""Kind schemas and reply schemas reuse API schemas with
{"$ref": "urn:nano:api:<name>[#/pointer]"} (api/openapi.py turns these into
#/components/schemas/<name>)."""


@functools.cache
def _registry() -> Registry:
    """Every specs/api schema under its urn:nano:api: name, for `$ref`s between them."""
    return Registry().with_resources(
        (KIND_REF_PREFIX + name, Resource.from_contents(sch, default_specification=DRAFT202012))
        for name, sch in _documents().items()
    )


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    sch = schema(name)
    cls = jsonschema.validators.validator_for(sch)
    cls.check_schema(sch)
    return _strict(cls)(sch, registry=_registry())


def _strict(cls: Any) -> Any:
    """`cls` with "integer" meaning a JSON integer: JSON Schema lets 2.0 pass as one, and
    a float where the code expects an int failed deep inside (LIMIT 282.0: a 500)."""
    checker = cls.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(cls, type_checker=checker)


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


# -- manifest kinds (specs/kinds/*.json) ----------------------------------------------------



@functools.cache
def _kind_documents() -> dict[str, dict]:
    """The `spec` schema of every manifest kind, keyed by kind, from specs/kinds/*.json."""
    out: dict[str, dict] = {}
    for path in sorted((HERE / "kinds").glob("*.json")):
        for kind, sch in json.loads(path.read_text()).items():
            if kind in out:
                raise ValueError(f"kind {kind!r} defined twice (second in {path.name})")
            out[kind] = sch
    return out


def kinds() -> list[str]:
    """Every manifest kind that has a schema."""
    return sorted(_kind_documents())


def api_refs(node: Any) -> set[str]:
    """Names of the specs/api schemas `node` refers to (urn:nano:api:<name>)."""
    if isinstance(node, dict):
        found = set().union(*(api_refs(v) for v in node.values())) if node else set()
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(KIND_REF_PREFIX):
            found.add(ref[len(KIND_REF_PREFIX):].split("#")[0])
        return found
    if isinstance(node, list):
        return set().union(*(api_refs(v) for v in node)) if node else set()
    return set()


def kind_api_schemas(kind: str) -> set[str]:
    """Names of the API body schemas that kind's schema refers to."""
    return api_refs(_kind_documents()[kind])


def kind_schema(kind: str) -> dict:
    """The schema of a whole manifest document of `kind`: {kind, name, state, spec}.

    Raises KeyError for an unknown kind, or when an API schema it refers to is missing.
    """
    try:
        spec = _kind_documents()[kind]
    except KeyError:
        raise KeyError(f"no manifest kind {kind!r}; kinds: {', '.join(kinds())}") from None
    missing = sorted(n for n in kind_api_schemas(kind) if n not in _documents())
    if missing:
        raise KeyError(f"kind {kind} refers to API schema(s) {', '.join(missing)}, "
                       "which specs/api does not define")
    return {
        "type": "object",
        "required": ["kind", "name"],
        "additionalProperties": False,
        "properties": {
            "kind": {"const": kind},
            "name": {"type": "string", "minLength": 1, "maxLength": 128},
            "state": {"type": "string", "enum": ["present", "absent"]},
            "spec": spec,
        },
    }


@functools.cache
def _kind_validator(kind: str) -> jsonschema.protocols.Validator:
    sch = kind_schema(kind)
    cls = jsonschema.Draft202012Validator
    cls.check_schema(sch)
    return _strict(cls)(sch, registry=_registry())


def validate_kind(kind: str, document: Any) -> list[str]:
    """Every problem of a manifest `document` of `kind`, as sentences naming the field
    (e.g. "spec.failover: must be of type boolean, got str"); [] when valid."""
    validator = _kind_validator(kind)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return [_say(e) for e in errors]
