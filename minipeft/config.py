"""The configuration every PEFT method shares, and the enums that name methods and tasks.

Field names follow Hugging Face ``peft`` so that a config written by one library reads in
the other (``adapter_config.json``). Method configs (``LoraConfig``, ...) subclass
``PeftConfig`` in their own tuner file.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar


class PeftType(str, enum.Enum):
    """Which method an adapter uses; the value is what ``adapter_config.json`` stores."""

    LORA = "LORA"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    VERA = "VERA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    LN_TUNING = "LN_TUNING"
    OFT = "OFT"
    HRA = "HRA"
    FOURIERFT = "FOURIERFT"
    BOFT = "BOFT"
    MISS = "MISS"
    ROAD = "ROAD"
    C3A = "C3A"


class TaskType(str, enum.Enum):
    """What the base model is for; it decides a few defaults (e.g. the head to train for SEQ_CLS)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class PeftConfig:
    """Fields common to every method.

    ``inference_mode`` marks an adapter as loaded for inference: its parameters stay frozen.
    """

    peft_type: PeftType | None = field(default=None, init=False)
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    # Fields that only steer minipeft at run time and are never written to adapter_config.json
    # (peft would not know them).
    runtime_only_fields: ClassVar[tuple[str, ...]] = ()
    # Advice added to the error for a field of the wrong type, where one mistake is common.
    field_advice: ClassVar[dict[str, str]] = {}
    # Fields peft's config for this method inherits from another method's but peft never reads:
    # a saved file that sets one loads with a warning (peft computes the same without it),
    # where any other field minipeft lacks is refused unless it holds peft's default.
    peft_ignores: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.task_type is not None and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                known = ", ".join(t.value for t in TaskType)
                raise ValueError(f"task_type={self.task_type!r} is not a task type; use one of: {known}") from None
        build_nested_configs(self)
        check_field_types(self)
        check_regexes(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in peft's layout (enums as strings, sets as sorted lists)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.runtime_only_fields:
                continue
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif dataclasses.is_dataclass(value):  # a config of a config (LoRA's eva_config)
                value = dataclasses.asdict(value)
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """A config from peft's dict layout (``adapter_config.json``); the class follows ``peft_type``."""
        from .checkpoint import config_from_dict  # late import: checkpoint needs the tuner registry

        config = config_from_dict(data)
        if not isinstance(config, cls):
            raise TypeError(f"peft_type {data.get('peft_type')!r} builds a {type(config).__name__}, not a {cls.__name__}")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> PeftConfig:
        """The config an adapter folder holds (its ``adapter_config.json``), as peft's
        ``PeftConfig.from_pretrained``: e.g. to read ``base_model_name_or_path`` before loading the
        base model. A local folder only (minipeft downloads nothing). As in peft, ``kwargs`` that
        name config fields fill those the file lacks (the file's values win), and the others, the
        hub's download options there, change nothing."""
        from .checkpoint import CONFIG_NAME, config_from_dict, read_config_file  # late: checkpoint needs the registry

        folder = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "")
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder!r}; give the folder an adapter was saved to "
                                    "(minipeft reads local folders, it does not download)")
        data = read_config_file(path)
        config = config_from_dict(data, source=path)
        if not isinstance(config, cls):
            raise TypeError(f"{path} holds a {type(config).__name__}, not a {cls.__name__}")
        missing = {k: v for k, v in kwargs.items() if k not in data and k in {f.name for f in dataclasses.fields(config)}}
        return dataclasses.replace(config, **missing) if missing else config

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write this config as ``save_directory/adapter_config.json`` (atomically), as peft's
        ``PeftConfig.save_pretrained`` does; the folder is made if missing."""
        from .atomic import atomic_write
        from .checkpoint import CONFIG_NAME

        folder = os.fspath(save_directory)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(f"cannot save a config to {folder!r}: it is a file; give a folder")
        os.makedirs(folder, exist_ok=True)
        text = config_json(self.to_dict())
        atomic_write(os.path.join(folder, CONFIG_NAME), lambda f: f.write(text))

    @property
    def is_prompt_learning(self) -> bool:
        """Prompt tuning, P-tuning and prefix tuning add virtual tokens instead of wrapping layers."""
        return self.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.PREFIX_TUNING)


def config_json(data: dict[str, Any]) -> bytes:
    """``adapter_config.json``'s text for a config's dict: indented, keys sorted (as peft writes it)."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# -- checks that several method configs share ---------------------------------------------------
def check_config_type(config: object) -> None:
    """A TypeError unless ``config`` is a minipeft config, saying how to turn peft's into one."""
    if isinstance(config, PeftConfig):
        return
    name = type(config).__name__
    if type(config).__module__.split(".")[0] == "peft":
        raise TypeError(f"got peft's {name}; minipeft takes its own configs, with the same fields: "
                        f"minipeft.{name}(...), or minipeft.PeftConfig.from_dict(config.to_dict()) to convert this one")
    raise TypeError(f"expected a minipeft config (LoraConfig, IA3Config, ...), got {name}")


def pattern_value(patterns: dict, key: str, default):
    """The value ``rank_pattern`` / ``alpha_pattern`` give the module named ``key``: that of the
    first pattern matching the end of the name at a dot (peft's rule), else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def default_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(default, pattern)`` under which ``pattern_value`` gives each module named in ``values``
    its value: the commonest value for the default, the others by name (e.g. lora_alpha and
    alpha_pattern, per layer). A pattern is a regex: a name is escaped (the "." of "a.b" would
    match "a_b" too), and anchored where it would also match a name ending in "." + it."""
    if not values:
        raise ValueError("no module to give a value to")
    default = collections.Counter(values.values()).most_common(1)[0][0]
    pattern = {}
    for key, value in values.items():
        if value != default:
            shadows = any(other != key and other.endswith("." + key) for other in values)
            pattern["^" + re.escape(key) + "$" if shadows else re.escape(key)] = value
    return default, pattern


def fits_annotation(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass annotation (lists for list/tuple/set, str for enums;
    a bool is no int or float here, though Python counts it as one)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_annotation(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple, set, frozenset):
        return isinstance(value, list) and (not args or all(fits_annotation(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(fits_annotation(v, args[1]) for v in value.values()))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint}
    if dataclasses.is_dataclass(hint):  # a config of a config (a JSON dict: build_nested_configs makes it one)
        return isinstance(value, (hint, dict))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation we do not model: the config's own __post_init__ judges it


def describe(hint: Any) -> str:
    """An annotation in words, for error messages: ``list[str] | None`` is 'a list of strings or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return "a list of " + _plural(args[0]) if args else "a list"
    if origin is dict:
        return "a dict of " + _plural(args[1]) if len(args) == 2 else "a dict"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    words = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None",
             dict: "a dict", list: "a list"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    if typing.get_origin(hint) in (list, tuple, set, frozenset):  # list[list[int]]: 'a list of lists of integers'
        args = typing.get_args(hint)
        return "lists of " + _plural(args[0]) if args else "lists"
    return {str: "strings", int: "integers", float: "numbers"}.get(hint, describe(hint) + " values")


def _is_finite(value: Any) -> bool:
    """No NaN or infinity in a number, or in the numbers of a dict or list (``alpha_pattern``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_is_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_finite(v) for v in value)
    return True


def _takes_list(hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_list(a) for a in args)
    return origin in (list, tuple, set, frozenset) or hint is list


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The annotation of each field of config class ``cls`` that its constructor takes."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a subclass's annotations that cannot be resolved: nothing to check by them
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}


def nested_config_class(hint: Any) -> type | None:
    """The dataclass a field annotated ``hint`` holds (LoRA's ``eva_config: EvaConfig | None``), if any."""
    return next((a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)), None)


def build_nested_configs(config: PeftConfig) -> None:
    """Turn each dict given for a field that holds a config of its own (as adapter_config.json
    holds it) into that config; its keys must be the config's fields."""
    for name, hint in _field_hints(type(config)).items():
        cls, value = nested_config_class(hint), getattr(config, name)
        if cls is not None and isinstance(value, dict):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"{type(config).__name__}.{name} has no field {unknown}; {cls.__name__}'s fields "
                                 f"are {known}")
            setattr(config, name, cls(**value))


def check_field_types(config: PeftConfig) -> None:
    """A ValueError for a field whose value does not fit its annotation, as ``adapter_config.json``
    is checked on load: a config that builds must also load back once saved. The cases this catches
    would otherwise run and mislead: ``inference_mode="False"`` reads as true (the adapter freezes),
    ``modules_to_save="qv"`` as the names 'q' and 'v', ``lora_alpha=nan`` makes every output NaN.
    A tuple, range or set where a list is expected becomes a list, and a path where a string is
    expected its string. A set is sorted, as peft's JSON holds it, and so is any collection of
    module names (``MODULE_NAME_FIELDS``, sets in peft, where order means nothing): one config,
    one file, from run to run."""
    for name, hint in _field_hints(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, (tuple, range, set, frozenset)) and _takes_list(hint):
            unordered = isinstance(value, (set, frozenset)) or name in MODULE_NAME_FIELDS
            value = sorted(value) if unordered else list(value)
            setattr(config, name, value)
        elif isinstance(value, os.PathLike) and fits_annotation("", hint):
            value = os.fspath(value)
            setattr(config, name, value)
        if not fits_annotation(value, hint):
            advice = f"; write [{value!r}]" if isinstance(value, str) and _takes_list(hint) else ""
            advice += f"; {config.field_advice[name]}" if name in config.field_advice else ""
            if type(value).__module__.split(".")[0] == "peft":
                advice += f"; that is peft's {type(value).__name__}: give minipeft's, or a dict of its fields"
            raise ValueError(f"{type(config).__name__}.{name} must be {describe(hint)}, "
                             f"got {value!r} ({type(value).__name__}){advice}")
        if not _is_finite(value):
            raise ValueError(f"{type(config).__name__}.{name} must be finite, got {value!r}")


def check_regexes(config: PeftConfig) -> None:
    """A ValueError naming the field for a regex that does not compile: a module-name field given
    as one string, ``layers_pattern``, and the keys of ``rank_pattern`` / ``alpha_pattern`` (and
    the other ``*_pattern`` dicts). Compiled alone, so that an error's position is in the user's text."""
    for name, pattern in _regexes(config):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{type(config).__name__}.{name}: {pattern!r} is not a regular expression ({err})") from None


def _regexes(config: PeftConfig) -> Iterator[tuple[str, str]]:
    """(field, regex) for every regex a config holds."""
    for name in MODULE_NAME_FIELDS:
        if isinstance(getattr(config, name, None), str):
            yield name, getattr(config, name)
    yield from (("layers_pattern", pattern) for pattern in _layer_patterns(config))
    for f in dataclasses.fields(config):
        if f.name.endswith("_pattern") and isinstance(getattr(config, f.name), dict):
            yield from ((f.name, key) for key in getattr(config, f.name))


def check_probability(config: PeftConfig, name: str, what: str = "a probability", one_allowed: bool = False) -> None:
    """A ValueError unless field ``name`` (a number, as ``check_field_types`` has made sure) lies in
    [0, 1), or in [0, 1] with ``one_allowed`` (dropping whole blocks or modules may drop all)."""
    value = getattr(config, name)
    if not (0.0 <= value <= 1.0 if one_allowed else 0.0 <= value < 1.0):
        interval = "[0, 1]" if one_allowed else "[0, 1)"
        raise ValueError(f"{type(config).__name__}.{name} is {what} in {interval}, got {value!r}")


def check_bias(config: PeftConfig, own: str) -> None:
    """A ValueError unless ``config.bias`` is one of peft's three choices: ``"none"``, ``"all"``
    (every bias of the model trains) or ``own`` (``"lora_only"``, ...: the adapted layers' biases)."""
    if config.bias not in ("none", "all", own):
        raise ValueError(f"{type(config).__name__}.bias must be 'none', 'all' or {own!r}, got {config.bias!r}")


def check_number(name: str, value, want: str, ok: Callable[[float], bool]) -> None:
    """A ValueError unless ``value`` is a finite int or float (not a bool) for which ``ok`` holds;
    ``want`` says in words what ``ok`` asks, for the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {want}, not {value!r}")


def is_positive_int(value: object) -> bool:
    """An int > 0, and not a bool (``True`` is an int to Python, but no rank or size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Fields that name modules, as a list (or one regex string); peft's configs keep them as sets.
MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")


def check_layer_selection(config: PeftConfig) -> None:
    """peft's rules for ``layers_to_transform`` / ``layers_pattern`` (LoRA, VeRA; the bottleneck
    adapters follow them too): the pattern only
    says where layer numbers are, and a regex ``target_modules`` takes no layer list (peft's LoRA
    refuses it, and peft's VeRA ignores it, so honouring it here would adapt other layers)."""
    split = next((p for p in _layer_patterns(config) if _splits_at_or(p)), None)
    if split is not None:
        raise ValueError(
            f"layers_pattern {split!r} has a '|' outside any group: peft puts the pattern inside a longer regex, "
            f"which it would split there. Give the alternatives as a list, e.g. {split.split('|')!r}"
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("layers_pattern only says where layer numbers are; give layers_to_transform as well")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError(
            "layers_to_transform needs target_modules as a list of names; with a regex (or 'all-linear'), "
            "put the layer numbers in the regex instead"
        )


def _layer_patterns(config: PeftConfig) -> list[str]:
    layers = getattr(config, "layers_pattern", None)
    return [layers] if isinstance(layers, str) else list(layers or [])


def _splits_at_or(pattern: str) -> bool:
    """Whether a regex has a ``|`` outside every group and character class (``a|b``, not ``(a|b)``)."""
    depth, in_class, escaped = 0, False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char in "()":
            depth += 1 if char == "(" else -1
        elif char == "|" and depth == 0:
            return True
    return False

