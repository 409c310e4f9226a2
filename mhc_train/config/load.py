"""Loading a config: Hydra composition of `configs/`, overrides, an optional YAML file, and one-line errors.

- `load_config(overrides, config_file)` composes `configs/config.yaml` with Hydra overrides, merges the file on top,
  checks keys and types against the schema, then validates once (`validate`, the pipeline rules included).
- Every unknown key or wrong type fails before Hydra runs, in one line that names the key and the closest spelling
  ("did you mean ..."), never Hydra's `+key` advice, which cannot work with a structured schema.
- `config_dir()` finds the `configs/` tree: $MHC_TRAIN_CONFIG_DIR, the copy a wheel installs, or the repository's.
"""

from __future__ import annotations

from typing import Any

from mhc_train.config.schema import Config, ConfigError
from mhc_train.config.validate import validate


def config_dir() -> str:
    """The `configs/` tree: $MHC_TRAIN_CONFIG_DIR, else the copy a wheel installs as the package `mhc_train.configs`
    (mhc_train/configs/), else the repository's (a source checkout or an editable install)."""
    import os
    from pathlib import Path

    override = os.environ.get("MHC_TRAIN_CONFIG_DIR")
    if override:
        if not Path(override).is_dir():
            raise ConfigError(f"MHC_TRAIN_CONFIG_DIR={override!r} is not a directory: point it at a configs/ tree")
        return os.path.abspath(override)  # Hydra wants an absolute path
    here = Path(__file__).resolve().parent.parent  # mhc_train/
    candidates = (here / "configs", here.parent / "configs")  # installed wheel, then source tree
    for d in candidates:
        if (d / "config.yaml").is_file():
            return str(d)
    raise ConfigError(
        f"no configs/ tree found (looked for config.yaml in {candidates[0]} and {candidates[1]}): reinstall mhc-train "
        "or set MHC_TRAIN_CONFIG_DIR to a configs/ directory"
    )


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


# --- key and type checks with one-line messages (run before Hydra, whose own advice misleads: "use +key") ---


def _fields(schema: type) -> dict:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(schema)}


def _hints(schema: type) -> dict:
    import typing

    return typing.get_type_hints(schema)


def _sub_schema(schema: type, name: str) -> type | None:
    import dataclasses

    hint = _hints(schema).get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _expected(hint: Any, key: str) -> str:
    import dataclasses
    import typing

    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a mapping of {key}.* keys"
    if typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (None,))[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):  # data.blend
            return f"a list of mappings with keys {', '.join(f.name for f in dataclasses.fields(item))}"
        return {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(item, "a list")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _literal(value: Any) -> str:
    """A value as it is written in an override (true, [0.8,0.9])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return str(value)


def _default(schema: type, name: str) -> Any:
    import dataclasses

    f = _fields(schema)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _unknown_key(segments: list[str], i: int, schema: type, where: str = "", groups: tuple = ()) -> ConfigError:
    """`segments[i]` is no key of `schema` (the level that `segments[:i]` names); `groups` are the config groups that
    are not schema keys (top level only). Suggests the closest spelling, never Hydra's `+key`, which cannot work."""
    import difflib

    def best(seg: str, level: type, extra: tuple = ()) -> str | None:
        names = [*_fields(level), *extra]
        return seg if seg in names else next(iter(difflib.get_close_matches(seg, names, n=1, cutoff=0.6)), None)

    prefix = ".".join(segments[: i + 1])
    head = f"unknown config key {'.'.join(segments)}{where}"
    first = best(segments[i], schema, groups if i == 0 else ())
    if first is not None and first in groups:
        return ConfigError(f"{head}; did you mean the config group {first}? (select one of its files: +{first}=NAME)")
    if first is not None:  # correct the rest of the path too where every later segment has a close match
        fixed, level = [*segments[:i], first], _sub_schema(schema, first)
        for seg in segments[i + 1 :]:
            match = best(seg, level) if level is not None else None
            if match is None:  # the rest is beyond repair: name only the first wrong key
                return ConfigError(f"unknown config key {prefix}{where}; did you mean {'.'.join(fixed[: i + 1])}?")
            fixed.append(match)
            level = _sub_schema(level, match)
        return ConfigError(f"{head}; did you mean {'.'.join(fixed)}?")
    if i > 0:  # a key of another section (schedule.step_milestones written as train.step_milestones)
        elsewhere = [
            f"{name}.{match}"
            for name in _fields(Config)
            if (sub := _sub_schema(Config, name)) is not None and sub is not schema
            for match in difflib.get_close_matches(segments[i], list(_fields(sub)), n=1, cutoff=0.8)
        ]
        if elsewhere and i == len(segments) - 1:
            return ConfigError(f"{head}; {'.'.join(segments[:i])} has no such key; did you mean {elsewhere[0]}?")
    level_name = ".".join(segments[:i]) or "the top level"
    known = [*_fields(schema), *(groups if i == 0 else ())]
    return ConfigError(
        f"unknown config key {prefix}{where}; {level_name} has no such key (known keys: {', '.join(known)})"
    )


class _Checker:
    """Checks a value against the schema's type with OmegaConf's own conversion rules (so '5' is an integer and
    ${model.vocab_size} is accepted), one scratch node per schema class."""

    def __init__(self):
        self._nodes: dict = {}

    def __call__(self, schema: type, name: str, value: Any, key: str, where: str = "", example: bool = True) -> None:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        node = self._nodes.get(schema)
        if node is None:
            node = self._nodes[schema] = OmegaConf.structured(schema)
        try:
            node[name] = value
        except OmegaConfBaseException:
            if _merges(node, name, value):  # a list of mappings into a list of dataclasses (data.blend): merge only
                return
            expected = _expected(_hints(schema)[name], key)
            sub = _sub_schema(schema, name)
            if sub is not None and isinstance(value, str) and not example:
                fix = f"a config group is chosen on the command line, {key}={value}, not in a file"
            elif sub is not None:
                fix = f"set its keys one by one, e.g. {key}.{next(iter(_fields(sub)))}=..."
            elif example:
                fix = f"e.g. {key}={_literal(_default(schema, name))}"
            else:
                fix = f"the default is {_literal(_default(schema, name))}"
            raise ConfigError(f"{key} expects {expected}, got {value!r}{where} ({fix})") from None


def _merges(node, name: str, value: Any) -> bool:
    """Whether `value` merges into `node[name]` (OmegaConf converts mappings to dataclass items on merge only)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(node, {name: value})
    except OmegaConfBaseException:
        return False
    return True


def _check_overrides(overrides: list[str], cfg_dir: str) -> None:
    """Every override names a schema key (or a config group and one of its files) and its value has the key's type."""
    import difflib
    import typing
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser

    check = _Checker()
    root = Path(cfg_dir)
    groups = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in _fields(Config)))
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_delete() or o.is_sweep_override() or o.package is not None or key.split(".")[0] == "hydra":
            continue  # deletions, sweeps, @package moves and Hydra's own keys: Hydra decides
        group = root.joinpath(*key.replace(".", "/").split("/"))
        if group.is_dir():  # a config group: the value names one of its YAML files
            value = o.value()
            if key in groups and not (o.is_add() or o.is_force_add()):
                raise ConfigError(
                    f"config group {key} is not in the defaults list of config.yaml: select it with "
                    f"+{key}={o.get_value_element_as_str()}"
                )
            if isinstance(value, str) and not (group / f"{value}.yaml").is_file():
                options = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
                close = difflib.get_close_matches(value, options, n=1)
                hint = f"did you mean {key}={close[0]}? " if close else ""
                raise ConfigError(
                    f"config group {key} has no option {value!r} (no {group / value}.yaml); "
                    f"{hint}available: {', '.join(options)}"
                )
            continue
        if "/" in key:
            continue  # a nested group path that does not exist: Hydra's message names it
        segments, schema = key.split("."), Config
        for i, seg in enumerate(segments):
            if seg not in _fields(schema):
                raise _unknown_key(segments, i, schema, groups=groups)
            if i == len(segments) - 1:
                check(schema, seg, o.value(), key)
                break
            sub = _sub_schema(schema, seg)
            if sub is None:
                hint, leaf = _hints(schema)[seg], ".".join(segments[: i + 1])
                if typing.get_origin(hint) is list:
                    break  # a list index: OmegaConf decides
                raise ConfigError(
                    f"{leaf} is a single value ({_expected(hint, leaf)}), not a section: write {leaf}=..."
                )
            schema = sub


def _reject_unknown_keys(
    node: dict, schema: type, prefix: str = "", where: str = "", check: _Checker | None = None
) -> None:
    """Every key of `node` (nested dicts) is a key of the schema; with `check`, every leaf value has its type too."""
    fields = _fields(schema)
    for key, value in node.items():
        key = str(key)
        path = f"{prefix}{key}"
        if "." in key:
            head, _, rest = key.partition(".")
            raise ConfigError(
                f"config key {path!r}{where} contains a dot: nest it instead ({prefix}{head}: {{{rest}: ...}})"
            )
        if key not in fields:
            raise _unknown_key(path.split("."), path.count("."), schema, where)
        sub = _sub_schema(schema, key)
        if isinstance(value, dict) and sub is not None:
            _reject_unknown_keys(value, sub, f"{path}.", where, check)
        elif check is not None:
            check(schema, key, value, path, where, example=False)


def _read_config_file(path: str):
    """The `--config` YAML as a DictConfig whose keys and value types match the schema; a ConfigError naming the
    file and the problem otherwise (missing, a directory, unreadable, invalid YAML, not a mapping)."""
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    try:
        from omegaconf._utils import get_yaml_loader  # OmegaConf's loader: what OmegaConf.load would parse

        loader = get_yaml_loader()
    except ImportError:  # pragma: no cover - an OmegaConf without it
        loader = yaml.SafeLoader
    p = Path(path)
    name = f"config file {path}"
    if p.is_dir():
        inside = sorted(x.name for x in p.glob("*.y*ml"))
        fix = f"pass one of its files, e.g. --config {p / inside[0]}" if inside else "pass the path of a YAML file"
        raise ConfigError(f"{name} is a directory, not a YAML file: {fix}")
    if not p.exists():
        cwd = "" if p.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{name} does not exist{cwd}: check the path")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{name} is not valid YAML: {problem}{at}; fix the syntax there") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name} is not UTF-8 text (invalid byte at offset {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be read: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name} must hold a mapping of config keys (e.g. 'train: {{max_steps: 100}}'), got {type(data).__name__} "
            f"{_literal(data)[:60]!r}"
        )
    _reject_unknown_keys(data, Config, where=f" in {path}", check=_Checker())
    return OmegaConf.create(data)


def _one_line(msg: str) -> str:
    """Hydra's multi-line messages as one line, without its search-path dump and its `+key` advice."""
    import re

    msg = msg.split("\nConfig search path")[0]
    msg = re.sub(r"\s*To append to your config use \+\S+", "", msg)
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def load_config(
    overrides: list[str] | None = None, config_file: str | None = None, config_name: str = "config", full: bool = True
):
    """Compose `configs/<config_name>.yaml` with Hydra overrides, merge an optional YAML file on top, check the schema
    (unknown keys and wrong types fail here, naming the key), validate, and return a `Config` dataclass. `full=False`
    (`mhc-train prepare`): the cross-field rules of a run are not checked (prepare validates its `data` part)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    GlobalHydra.instance().clear()
    cfg_dir = config_dir()
    try:
        file_cfg = _read_config_file(config_file) if config_file else None
        _check_overrides(list(overrides or []), cfg_dir)
        with initialize_config_dir(config_dir=cfg_dir, version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        if file_cfg is not None:
            cfg = OmegaConf.merge(cfg, file_cfg)
        _reject_unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)  # `+key=...` bypasses struct mode
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config error: {_one_line(str(e))}") from e
    except ConfigError:
        raise
    except Exception as e:  # hydra's own errors (bad override syntax, a missing group file)
        if type(e).__module__.startswith("hydra"):
            raise ConfigError(f"config error: {_one_line(str(e))}") from e
        raise
    if full:
        validate(obj)
    return obj


def to_dict(cfg: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
