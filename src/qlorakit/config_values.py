"""A config key's value as its type: from a YAML file (typed already) or a flag's text. A value that is not is one
line naming the key and where the value came from (config.py reports it with every other problem)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A mistake in the user's configuration. The message is meant to be printed as is, without a traceback."""


class ValueProblem(UserError):
    """A value that is not of its key's type; the message names key and source."""


def coerce(key: str, typ: type, value, source: str):
    """``value`` (from a YAML file or a flag's text) as ``typ``, the type of config key ``key``; ValueProblem naming
    key and source otherwise."""
    if typ is list:
        return dataset_list(key, value, source)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError  # YAML's 2.5 is not silently 2
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, bool):  # YAML's true/false, for keys such as bf16 that also take "auto"
                return str(value).lower()
            if isinstance(value, dict) or value is None:
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
    raise ValueProblem(f"{key}: {value!r} (from {source}) is not {want}")


def dataset_list(key: str, value, source: str) -> list:
    """A list key's value: a YAML list (from a file), or its text in YAML flow style (from a flag). Each entry is
    a mapping or a string; what an entry says is checked where the data is read (qlorakit.data.sources)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueProblem(f"{key}: {value!r} (from {source}) is not a YAML list; write it as "
                              "'[{path: a.jsonl, weight: 0.7}, {path: b.parquet}]'") from None
    if not isinstance(value, list) or not value:
        hint = " (a single source or the compact PATH:OPTION syntax goes in --dataset)" if isinstance(value, str) \
            else ""
        raise ValueProblem(f"{key}: {value!r} (from {source}) is not a non-empty list of datasets, each a mapping "
                          f"with at least 'path'{hint}")
    bad = next((i for i, e in enumerate(value) if not isinstance(e, (dict, str))), None)
    if bad is not None:
        raise ValueProblem(f"{key}[{bad}]: {value[bad]!r} (from {source}) is not a mapping such as "
                          "{path: a.jsonl, weight: 0.7}")
    return [dict(e) if isinstance(e, dict) else e for e in value]


def load_yaml(path: str) -> dict[str, tuple[object, str]]:
    """A config file's key -> (value, the file), or ConfigError in one line naming the file (and the line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return {str(k): (v, path) for k, v in data.items()}


def implied_values(given: dict) -> dict:
    """The defaults another given key rules out, for keys not given: prompt_loss_weight 0 where train_on_source is
    given (true trains the prompt tokens at weight 1 already; false, as in qlora's command lines, asks for the
    responses only), or where a preference method scores completions only."""
    if "prompt_loss_weight" not in given and ("train_on_source" in given or given.get("method", "sft") != "sft"):
        return {"prompt_loss_weight": 0.0}
    return {}
