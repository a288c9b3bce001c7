"""The workflow configuration's schema: its defaults, its validators, overrides in ``KEY=VALUE`` form.

The schema is ``workflow/schemas/config.schema.yaml`` (shipped inside the package as
``fastkd/config.schema.yaml``): every setting's one default and one validator. The bottom layer: it imports
no stage. The whole check of a config (schema, then what needs the stages): :mod:`fastkd.checks`.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml
from jsonschema import Draft7Validator

from fastkd.errors import FastkdError

SCHEMA_FILE = Path(__file__).with_name("config.schema.yaml")


class ConfigError(FastkdError):
    """The configuration is invalid; the message lists every problem found."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    merged = {k: v for k, v in schema.items() if k != "$ref"}
    return {**node, **merged}


def fill_defaults(instance: Any, schema: dict, root: dict | None = None) -> Any:
    """Fill missing object properties from the schema's ``default`` values, recursively.

    A dict default is merged key by key under what the user gave, so a partial block
    (``resources: {train_teacher: {threads: 4}}``) keeps the defaults of the keys it leaves out.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"], root)
    if not isinstance(instance, dict):
        return instance
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in instance:
            if "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            else:
                continue
        elif isinstance(instance[key], str):
            instance[key] = _coerce(instance[key], sub)
        elif isinstance(instance[key], dict) and isinstance(sub.get("default"), dict):
            for dkey, dval in sub["default"].items():
                instance[key].setdefault(dkey, copy.deepcopy(dval))
        fill_defaults(instance[key], sub, root)
    return instance


def _floats(instance: Any, schema: dict, root: dict) -> None:
    """Numbers where the schema says number (not integer) become floats: 3 and 3.0 are one setting, so
    the settings files and provenance written from configs, flags and ``--set`` compare equal."""
    schema = _resolve(schema, root)
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _floats(item, schema["items"], root)
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        value, sub = instance.get(key), _resolve(sub, root)
        branches = sub.get("anyOf", [sub])  # a setting or a sweep of it: a number or a list of numbers
        if any(b.get("type") == "number" for b in branches) and _is_int(value):
            instance[key] = float(value)
        elif isinstance(value, list) and any(b.get("type") in ("array", ["array", "null"])
                                             and b.get("items", {}).get("type") == "number" for b in branches):
            instance[key] = [float(v) if _is_int(v) else v for v in value]
        elif isinstance(value, (dict, list)):
            _floats(value, sub, root)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(value: str, schema: dict):
    """A string where the schema wants a number or boolean, as Snakemake's ``--config key=value`` passes
    nested values (``--config "distillation={'temperature': 2}"`` gives '2'): parse it as YAML."""
    types = [t for b in schema.get("anyOf", [schema]) for t in
             ([b["type"]] if isinstance(b.get("type"), str) else b.get("type", []))]
    wanted = {"number": (int, float), "integer": (int,), "boolean": (bool,), "array": (list,)}
    if "string" in types or not any(t in wanted for t in types):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    ok = any(isinstance(parsed, wanted[t]) and (t == "boolean" or not isinstance(parsed, bool))
             for t in types if t in wanted)
    return parsed if ok else value


def schema_node(key: str) -> dict:
    """The schema of one dotted config key, e.g. ``distillation.temperature`` (``$ref`` resolved)."""
    root = load_schema()
    node = root
    for part in key.split("."):
        properties = _resolve(node, root).get("properties", {})
        if part not in properties:
            raise KeyError(f"{key!r} is not a fastkd config key")
        node = properties[part]
    return _resolve(node, root)


def default(key: str) -> Any:
    """The schema's default of a dotted config key: the one place a setting's default lives."""
    return copy.deepcopy(schema_node(key)["default"])


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """Validate single settings (``{dotted key: value}``) by their schema entries; return them.

    Library functions called outside a validated config (from the command line, a benchmark) check
    their arguments here, so every value has one validator: the schema. Raises :class:`ConfigError`
    naming each key, value and what would be valid.
    """
    problems = []
    for key, value in values.items():
        for error in Draft7Validator(schema_node(key)).iter_errors(value):
            problems.append(_describe(error, key))
    if problems:
        raise ConfigError("invalid value(s):\n  - " + "\n  - ".join(problems))
    return values


def arg_type(key: str):
    """An argparse ``type=`` for a flag that sets config key ``key``: parsed as YAML, checked by the schema.

    For a list key (``teachers.folds``) each value of an ``nargs`` flag is checked as one item.
    """
    import argparse

    node = schema_node(key)
    types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    item = "array" in types and isinstance(node.get("items"), dict)  # a list, or a list or null
    node = _resolve(node["items"], load_schema()) if item else node

    def parse(text: str):
        value = _coerce(text, node)
        if isinstance(value, str) and value.lower() in ("null", "none"):
            value = None
        problems = [_describe(e, f"{key}[]" if item else key) for e in Draft7Validator(node).iter_errors(value)]
        if problems:
            raise argparse.ArgumentTypeError(problems[0])
        return value

    parse.__name__ = key  # argparse names the type in its messages
    return parse


def overrides(config: dict, prefix: str = "") -> list[str]:
    """``KEY=VALUE`` of every leaf of a (partial) config, e.g. ``student.schedule.epochs=4``: what
    :func:`parse_overrides` reads back (values as JSON, which is YAML)."""
    pairs = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += overrides(value, f"{name}.")
        else:
            pairs.append(f"{name}={value if isinstance(value, str) else json.dumps(value)}")
    return pairs


def parse_overrides(pairs: list[str]) -> dict:
    """``["student.schedule.epochs=4", ...]`` -> a partial config; values are parsed as YAML, as
    Snakemake's ``--config`` parses them (a number where the schema wants a string stays a string).
    An unknown key is an error; the values are checked when the config is validated."""
    config: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ConfigError(f"{pair!r}: expected KEY=VALUE, e.g. student.schedule.epochs=10")
        try:
            node = schema_node(key)
        except KeyError:
            raise ConfigError(f"{pair!r}: {key!r} is not a fastkd config key (see config.yaml)") from None
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        if isinstance(value, (int, float)) and "string" in ([node.get("type")] if isinstance(node.get("type"), str)
                                                            else node.get("type", [])):
            value = text
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return config


def _key_name(path) -> str:
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "(top level)"


#: what a value breaking a schema keyword must do instead (``{}``: the keyword's value)
PHRASES = {"minimum": "must be >= {}", "exclusiveMinimum": "must be > {}", "maximum": "must be <= {}",
           "exclusiveMaximum": "must be < {}", "pattern": "must match the pattern {}", "minLength": "must not be empty",
           "minItems": "must hold at least {} item(s)", "maxItems": "must hold at most {} item(s)",
           "uniqueItems": "must not repeat a value"}


def _describe(error, prefix: str = "") -> str:
    """One line per schema violation: key, value, and what would be valid."""
    key = _key_name([*([prefix] if prefix else []), *error.absolute_path])
    value = error.instance
    v, expected = error.validator, error.validator_value
    shown = f"{value!r} ({type(value).__name__})"
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        where = f"under '{key}'" if error.absolute_path else "at the top level"
        return (f"unknown key(s) {', '.join(map(repr, unknown))} {where}; "
                f"valid keys: {', '.join(allowed)}")
    if v == "type":
        types = expected if isinstance(expected, list) else [expected]
        what = f"expected {' or '.join('null' if t == 'null' else t for t in types)}"
    elif v in PHRASES:
        what = PHRASES[v].format(expected)
    elif v == "enum":
        what = f"must be one of: {', '.join(map(str, expected))}"
    elif v == "anyOf":
        # a setting or a sweep of it: the branch of the value's own shape says what is wrong with it
        is_list = isinstance(value, list)
        specific = [e for e in error.context if e.validator != "type"
                    and is_list == bool(e.relative_path or e.validator in ("minItems", "uniqueItems"))]
        if len(specific) == 1:
            sweep = " (or a list of such values: a sweep)" if isinstance(value, (int, float, str)) else ""
            return _describe(specific[0], prefix) + sweep
        what = "must be " + ", or ".join(_form(branch) for branch in expected)
    else:
        what = error.message
    description = error.schema.get("description")
    hint = f" ({' '.join(str(description).split())})" if description else ""
    return f"{key} = {shown}: {what}{hint}"


def _form(schema: dict) -> str:
    """A value a schema accepts, in words (for the alternatives of an ``anyOf``)."""
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if schema.get("type") == "array":
        return "a list of such values (no repeats)"
    bounds = [f"{op} {schema[k]}" for k, op in (("exclusiveMinimum", ">"), ("minimum", ">="),
                                                  ("exclusiveMaximum", "<"), ("maximum", "<=")) if k in schema]
    return f"a {schema.get('type', 'value')}" + (f" {' and '.join(bounds)}" if bounds else "")


def complete(config: dict, check: Callable[[dict], list[str]] | None = None) -> dict:
    """Fill every default into ``config`` (in place) and check it against the schema; return it.

    ``check``: the problems the schema cannot express (:func:`fastkd.checks.validate_config`), asked for when
    the schema finds none, before numbers become floats (so a message shows a value as it was written).
    Raises :class:`ConfigError` listing every problem, each naming the key, the offending value and what
    would be valid.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(config).__name__}")
    schema = load_schema()
    fill_defaults(config, schema)
    errors = sorted(Draft7Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e) for e in errors]
    if not problems and check is not None:
        problems = check(config)
    if problems:
        raise ConfigError("invalid fastkd config:\n  - " + "\n  - ".join(problems))
    _floats(config, schema, schema)
    return config


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def read_config_files(files: list[str | Path]) -> dict:
    """YAML config files merged key by key (later ones override earlier ones), not yet completed."""
    config: dict = {}
    for file in files:
        with open(file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the config must be a mapping of keys to values")
        _merge(config, data)
    return config
