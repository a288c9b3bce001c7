"""Load, complete and validate the workflow configuration.

The schema is ``workflow/schemas/config.schema.yaml`` (shipped inside the package as
``fastkd/config.schema.yaml``). :func:`validate_config` is called by the Snakefile at parse time and by
``fastkd config``; it fills every default, then reports *all* problems at once, each naming the key,
the offending value and what would be valid. Checks a JSON schema cannot express (the dataset folder
exists, the teacher configuration is preprocessed, an external teacher folder holds the folds) follow.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    elif v == "minimum":
        what = f"must be >= {expected}"
    elif v == "exclusiveMinimum":
        what = f"must be > {expected}"
    elif v == "maximum":
        what = f"must be <= {expected}"
    elif v == "exclusiveMaximum":
        what = f"must be < {expected}"
    elif v == "enum":
        what = f"must be one of: {', '.join(map(str, expected))}"
    elif v == "pattern":
        what = f"must match the pattern {expected}"
    elif v == "minLength":
        what = "must not be empty"
    elif v == "minItems":
        what = f"must hold at least {expected} item(s)"
    elif v == "maxItems":
        what = f"must hold at most {expected} item(s)"
    elif v == "uniqueItems":
        what = "must not repeat a value"
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


def validate_config(config: dict, base_dir: str | Path | None = None, check_files: bool = True) -> dict:
    """Fill defaults into ``config`` (in place) and validate it; return it.

    ``base_dir`` resolves relative paths (default: the current directory, Snakemake's workdir).
    ``check_files`` also checks the dataset folder and an external teacher folder on disk.
    Raises :class:`ConfigError` listing every problem.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(config).__name__}")
    schema = load_schema()
    fill_defaults(config, schema)
    errors = sorted(Draft7Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e) for e in errors]
    if not problems:
        base_dir = Path(base_dir or ".")
        problems = _holdout_problems(config, base_dir, check_files) or _semantic_problems(config, base_dir, check_files)
    if problems:
        raise ConfigError("invalid fastkd config:\n  - " + "\n  - ".join(problems))
    _floats(config, schema, schema)
    return config


def _semantic_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    from fastkd.nnunet import DATASET_NAME_PATTERN

    problems = []
    plans, teachers = config["plans"], config["teachers"]
    if teachers["configuration"] not in plans["configurations"]:
        problems.append(
            f"teachers.configuration = {teachers['configuration']!r}: must be one of "
            f"plans.configurations {plans['configurations']} (only those are preprocessed)")
    raw = config["dataset"]["raw"]
    if raw != "demo":
        folder = Path(raw) if Path(raw).is_absolute() else base_dir / raw
        if not DATASET_NAME_PATTERN.match(folder.name):
            problems.append(f"dataset.raw = {raw!r}: the folder must be named DatasetXXX_Name "
                            f"(three digits, e.g. Dataset004_Hippocampus), or use 'demo'")
        elif check_files and not (folder / "dataset.json").is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            problems.append(
                f"dataset.raw = {raw!r}: no dataset.json in {folder} "
                + (f"(found: {', '.join(found) or 'nothing'})" if found is not None else "(the folder does not exist)")
                + "; give an nnU-Net raw dataset folder or 'demo'")
    else:
        from fastkd.demo import check_options

        try:
            check_options(config["dataset"]["demo"])
        except ValueError as e:  # options that exclude each other, e.g. anisotropic and spacing
            problems.append(f"dataset.demo: {e}")
    if check_files and teachers["model_folder"] is not None and not problems:
        from fastkd.teachers import TeacherFolderError, validate_model_folder

        folder = Path(teachers["model_folder"])
        folder = folder if folder.is_absolute() else base_dir / folder
        try:
            validate_model_folder(folder, teachers["configuration"], teachers["folds"], teachers["checkpoint"])
        except TeacherFolderError as e:
            problems.append(f"teachers.model_folder: {e}")
    problems += _distillation_problems(config)
    if not problems:
        problems += _softlabel_problems(config, base_dir, check_files)
    if not problems and check_files and not plans["preprocess"]:
        problems += _preprocessed_problems(config, base_dir)
    if not problems:
        problems += _evaluation_problems(config, base_dir, check_files)
    return problems


def _distillation_problems(config: dict) -> list[str]:
    """The convex loss form (1 - alpha) * nnU-Net's loss + alpha * KD needs alpha <= 1 (the schema allows any
    alpha >= 0: the additive form's weight of the KD term)."""
    d = config["distillation"]
    forms = d["loss"] if isinstance(d["loss"], list) else [d["loss"]]
    alphas = d["alpha"] if isinstance(d["alpha"], list) else [d["alpha"]]
    above = [a for a in alphas if a > 1]
    if "convex" in forms and above:
        return [f"distillation.alpha = {above[0]} with distillation.loss 'convex': (1 - alpha) * nnU-Net's loss + "
                "alpha * KD needs 0 <= alpha <= 1; use loss 'additive' (nnU-Net's loss + alpha * KD) for a larger weight"]
    return []


def _holdout_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """``dataset.holdout``: a real dataset's, the only test set, fastkd preprocesses (so nnU-Net never sees
    the held-out cases), and at least 5 cases are left to train on."""
    n_test, dataset = config["dataset"]["holdout"]["n_test"], config["dataset"]
    if n_test == 0:
        return []
    key = f"dataset.holdout.n_test = {n_test}"
    if dataset["raw"] == "demo":
        return [f"{key}: dataset.raw = 'demo' holds its test cases apart already (dataset.demo.n_test = "
                f"{dataset['demo']['n_test']}); set dataset.holdout.n_test: 0, or dataset.demo.n_test for more"]
    evaluation = config["evaluation"]
    if evaluation["test_images"] or evaluation["test_labels"]:
        return [f"{key} and evaluation.test_images = {evaluation['test_images']!r}: one test set only; hold cases "
                "back (dataset.holdout) or name a test set (evaluation.test_images / test_labels), not both"]
    if not config["plans"]["preprocess"]:
        return [f"{key} needs plans.preprocess: true: fastkd preprocesses the training cases only, so nnU-Net "
                "never sees the held-out cases (a dataset preprocessed elsewhere holds them all)"]
    if not check_files:
        return []
    from fastkd.nnunet import raw_case_ids

    raw = base_dir / dataset["raw"]
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir():
        return [f"{key}: {dataset['raw']} has its own labelled test set (imagesTs, labelsTs); one test set only: "
                "evaluate on it (dataset.holdout.n_test: 0)"]
    try:
        n_cases = len(raw_case_ids(raw))
    except (FastkdError, ValueError, OSError):
        return []  # the dataset's own problems are reported by the soft-label checks
    if n_cases - n_test < 5:
        valid = f"0-{n_cases - 5}" if n_cases > 5 else "0"
        return [f"{key}: {dataset['raw']} has {n_cases} labelled cases, which leaves {n_cases - n_test} to train on; "
                f"nnU-Net's 5-fold split needs at least 5: use {valid}"]
    return []


def _evaluation_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """A test set is complete (images and labels) and holds no training case; without one, every student
    fold has validation cases to be evaluated on."""
    evaluation, demo = config["evaluation"], config["dataset"]["raw"] == "demo"
    if not evaluation["enabled"] or config["dataset"]["holdout"]["n_test"]:
        return []  # held-out cases are a test set, never training cases: they are picked out of them
    images, labels = evaluation["test_images"], evaluation["test_labels"]
    if (images is None) != (labels is None):
        return [f"evaluation.test_images = {images!r}, evaluation.test_labels = {labels!r}: give both folders of "
                "the test set, or neither (then the dataset's own labelled imagesTs/labelsTs, else each student fold's "
                "validation cases)"]
    from fastkd.evaluate import held_out_problems, test_set

    found = test_set({**config, "dataset": {**config["dataset"], "raw": str(base_dir / config["dataset"]["raw"])}}
                     if not demo else config)
    if found is None:
        if "all" in config["student"]["folds"]:
            return ["student.folds includes 'all' (trained on every case), which leaves no validation cases to "
                    "evaluate it on: set evaluation.test_images and test_labels (a labelled test set), or "
                    "evaluation.enabled: false"]
        return []
    if demo:
        n_test = config["dataset"]["demo"]["n_test"]
        if n_test == 0 and images and not Path(images).is_absolute():
            return [f"evaluation.test_images = {images!r}: the demo writes no test cases (dataset.demo.n_test = 0); "
                    "set dataset.demo.n_test >= 1, or evaluation.test_images / test_labels: null"]
        return []
    if not check_files:
        return []
    from fastkd.nnunet import raw_case_ids, read_dataset_json

    raw = base_dir / config["dataset"]["raw"]
    try:
        dataset_json, training = read_dataset_json(raw), raw_case_ids(raw)
    except (FastkdError, ValueError, OSError):
        return []  # the dataset's own problems are reported by the soft-label checks
    return held_out_problems(raw / found[0], raw / found[1], dataset_json, training)


def _preprocessed_problems(config: dict, base_dir: Path) -> list[str]:
    """``plans.preprocess: false``: nnU-Net must have preprocessed the dataset with the teachers' plans."""
    from fastkd.nnunet import PLANNERS
    from fastkd.paths import Paths

    paths = Paths(config)
    for configuration in config["plans"]["configurations"]:
        data = base_dir / paths.preprocessed_dataset / paths.data_identifier(configuration)
        missing = next((f for f in (base_dir / paths.plans_file, data) if not f.exists()), None)
        if missing is not None:
            planner = {plans: cls for cls, plans in PLANNERS.values()}.get(paths.plans_name, "<the teachers' planner>")
            pl = "" if paths.plans_name == "nnUNetPlans" else f" -pl {planner}"
            return [f"plans.preprocess = false: {missing} does not exist: {paths.dataset_name} is not preprocessed with "
                    f"the teacher plans {paths.plans_name} ({configuration}); run `nnUNetv2_plan_and_preprocess -d "
                    f"{paths.dataset_id} -c {configuration}{pl}` first, or let fastkd preprocess (plans.preprocess: "
                    "true, the workflow's `snakemake preprocessed`)"]
    return []


def _softlabel_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """Extra teacher folders exist and share the teachers' preprocessed grid; no more shards than cases;
    student base plans exist beside the teachers' with the same grid."""
    from fastkd.nnunet import data_identifier, raw_case_ids, read_plans
    from fastkd.paths import Paths
    from fastkd.teachers import TeacherFolderError, teacher_sets, validate_model_folder

    def resolve(path) -> Path:
        return base_dir / path  # an absolute path stays itself

    problems = []
    teachers = config["teachers"]
    names = [s["name"] for s in teacher_sets(config, Paths(config).teacher_folder)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"teachers.extra: teacher folders need distinct names (their manifests are named after "
                        f"them); repeated: {', '.join(repeated)}")
    if not check_files:
        return problems
    main = {**teachers, "model_folder": str(resolve(teachers["model_folder"]))} if teachers["model_folder"] else teachers
    paths = Paths({**config, "teachers": main})
    grid = paths.data_identifier(teachers["configuration"])
    for i, extra in enumerate(teachers["extra"]):
        configuration = extra["configuration"] or teachers["configuration"]
        try:
            plans = validate_model_folder(resolve(extra["model_folder"]), configuration, extra["folds"],
                                          extra["checkpoint"])
        except TeacherFolderError as e:
            problems.append(f"teachers.extra[{i}].model_folder: {e}")
            continue
        theirs = data_identifier(plans, configuration)
        if theirs != grid:
            problems.append(f"teachers.extra[{i}].model_folder: preprocessed as {theirs!r}, the teachers as {grid!r}; "
                            "the teachers of one soft-label cache must share the preprocessed grid")
    base = config["student"]["plans"]
    if base is not None:
        file = resolve(paths.student_base_plans_file)
        there = sorted(p.stem for p in file.parent.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint",
                                                                                     "splits_final"))
        if not file.is_file():
            problems.append(f"student.plans = {base!r}: no plans {file} (plans there: {', '.join(there) or 'none'}); "
                            f"name plans preprocessed beside the teachers', or null for the teachers' {paths.plans_name}")
        else:
            try:
                theirs = data_identifier(read_plans(file), teachers["configuration"])
            except FastkdError as e:
                theirs = None
                problems.append(f"student.plans = {base!r}: {e}")
            if theirs is not None and theirs != grid:
                problems.append(f"student.plans = {base!r}: its {teachers['configuration']} data is {theirs!r}, the "
                                f"teachers' is {grid!r}; the student trains on the teachers' preprocessed data, where "
                                f"the soft labels are, so its plans must share that data_identifier (e.g. "
                                f"{paths.plans_name})")
    raw = config["dataset"]["raw"]
    try:
        n_cases = config["dataset"]["demo"]["n_cases"] if raw == "demo" else len(raw_case_ids(resolve(raw)))
    except (KeyError, ValueError, OSError) as e:
        return problems + [f"dataset.raw = {raw!r}: cannot list its training cases ({type(e).__name__}: {e}); "
                           "dataset.json needs file_ending, channel_names and labels, imagesTr/ the images"]
    if config["softlabels"]["shards"] > n_cases:
        problems.append(f"softlabels.shards = {config['softlabels']['shards']}: more soft-label jobs than training "
                        f"cases ({n_cases}); use 1-{n_cases}")
    return problems + _top_k_problems(config, resolve(raw) if raw != "demo" else None)


def _top_k_problems(config: dict, raw: Path | None) -> list[str]:
    """softlabels.top_k: uint8 values, a softmax dataset, and k below its number of classes (checked here
    for raw datasets; the soft-label job checks it again against the teachers' heads)."""
    k = config["softlabels"]["top_k"]
    if k is None:
        return []
    if config["softlabels"]["dtype"] != "uint8":
        return [f"softlabels.top_k = {k} stores uint8 values: set softlabels.dtype: uint8 "
                f"(is {config['softlabels']['dtype']}) or softlabels.top_k: null"]
    if raw is None or not (raw / "dataset.json").is_file():
        return []
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset_json = json.loads((raw / "dataset.json").read_text())
    labels = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if labels.has_regions:
        return [f"softlabels.top_k = {k}: {raw.name} is region-based; its regions' probabilities are independent "
                "and stored whole (set softlabels.top_k: null)"]
    if k >= labels.num_segmentation_heads:
        return [f"softlabels.top_k = {k}: must be below the number of classes of {raw.name} "
                f"({labels.num_segmentation_heads}), or null"]
    return []


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(files: list[str | Path], base_dir: str | Path | None = None) -> dict:
    """Read YAML config files (later ones override earlier ones, key by key) and validate."""
    config: dict = {}
    for file in files:
        with open(file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the config must be a mapping of keys to values")
        _merge(config, data)
    return validate_config(config, base_dir=base_dir)

