"""The one precedence rule (``resolve``): command-line flags > a ``--config`` JSON file > an entry script's
SWEEP lists and own defaults > the method's paper defaults (``METHOD_DEFAULTS``) > the field defaults of
``Config``; and the ``--config`` file itself (``read_config_file``).

Here too the refusals that need to know what the user said, not only the values that came out: a feed,
a dropout switch or a modality the run cannot honour is an error, a key it never reads a warning (an info line
when it comes from the --config file alone, which may be shared by several methods).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from . import once
from .bounds import beyond_float
from .config import Config
from .errors import ConfigError, ValuesTogether, error_line, parse_json
from .methods import METHOD_DEFAULTS, newly_unread, side_network, unread_keys

log = logging.getLogger(__name__)
SWITCHED_OFF = "switched off"  # the ``once`` topic of ``switched_off``'s warnings


def resolve(defaults: dict | None = None, file_values: dict | None = None, flags: dict | None = None,
            source: str = "command line") -> Config:
    """The one precedence rule: ``flags`` > ``file_values`` (a --config file) > ``defaults`` (an entry
    script's grid point over its own defaults) > the paper defaults of the method these layers name >
    the field defaults. A method's defaults sit below everything a user or script says."""
    upper = {**(defaults or {}), **(file_values or {}), **(flags or {})}
    method = upper.get("method", Config.method)
    cfg = Config.from_dict({**METHOD_DEFAULTS.get(method, {}), **upper}, source=source)
    said = {**(file_values or {}), **(flags or {})}  # what the user gave: it wins, or it is an error
    if said.get("feed") == "cached" and cfg.feed != "cached":
        why = "has no item encoder" if cfg.method == "id" else "trains through the backbones, so it runs live"
        raise ConfigError(f"feed=cached: method={cfg.method} {why} (only IISAN's states can be cached); "
                          "leave --feed out")
    if said.get("feed") and cfg.method == "id":  # feed=live, the only one it takes, is what it records
        log.info("feed=%s is ignored: method=id has no item encoder", said["feed"])
    live_text_side = side_network(cfg.method) and cfg.feed == "live" and cfg.towers != "image"
    if "text_encoder_dropout" in said and cfg.text_encoder_dropout and not live_text_side:  # ("false" is False)
        raise ConfigError(f"text_encoder_dropout: the authors' dropout in IISAN's frozen text encoder, which only a "
                          f"live IISAN run with a text tower has (this one: method={cfg.method}, feed={cfg.feed}, "
                          f"towers={cfg.towers}); leave --text-encoder-dropout out")
    if said.get("modality") not in (None, cfg.modality) and "modality" not in unread_keys(cfg.method, cfg.towers,
                                                                                          cfg.feed):
        raise ConfigError(f"modality={said['modality']}: towers={cfg.towers} is one modality, so only intra applies")
    # What was said, compared as the config saves it, as train.log's header does: a flag's value is the string
    # typed, '8', not the default 8; a layer list, (0, 2), is saved as [0, 2]
    defaults, values = Config().to_dict(), cfg.to_dict()
    for warning in switched_off(cfg, {k for k in said if said[k] is not None and values[k] != defaults[k]}):
        if once.first(SWITCHED_OFF, warning):  # (a sweep resolves every point)
            log.warning("%s", warning)
    unread = newly_unread({k: values[k] for k in said}, defaults, cfg.method, cfg.towers, cfg.feed)
    typed = [k for k in unread if k in (flags or {})]
    filed = [k for k in unread if k not in typed]  # a --config file's: one shared by several methods holds them
    for keys, level, where in ((typed, logging.WARNING, ""), (filed, logging.INFO, " (from the --config file)")):
        if keys:
            log.log(level, "%s%s: not read by this run (method=%s, feed=%s, towers=%s), so it changes nothing",
                    ", ".join(keys), where, cfg.method, cfg.feed, cfg.towers)
    return cfg


def switched_off(cfg: Config, given: set[str]) -> list[str]:
    """A warning for each key of ``given`` that another setting of ``cfg`` turns off: a side network's switch
    (``--gate-temperature`` with ``--fusion add``) or the title length of an image tower alone. Hashed and
    recorded as ever: only said."""
    off = []
    if "san_heads" not in unread_keys(cfg.method, cfg.towers, cfg.feed):  # (a run with a side network)
        if "gate_temperature" in given and cfg.fusion == "add":
            off.append(f"gate_temperature={cfg.gate_temperature}: fusion=add has no gates, so it changes nothing")
        if "intra_start" in given and cfg.include_embedding_state:
            off.append(f"intra_start={cfg.intra_start}: only a run with --no-include-embedding-state reads it, "
                       "so it changes nothing")
    if "title_tokens" in given and cfg.towers == "image" and cfg.method != "id":  # (id: not read at all)
        off.append(f"title_tokens={cfg.title_tokens}: towers=image reads no titles, so it changes nothing")
    return off


def said_switched_off(cfg: Config) -> list[str]:
    """The warnings of ``switched_off`` that ``resolve`` gave in this process for ``cfg``'s values: what its
    console said before the run folder, and its train.log, were opened."""
    defaults = Config().to_dict()
    return [w for w in switched_off(cfg, {k for k, v in cfg.to_dict().items() if v != defaults[k]})
            if once.said(SWITCHED_OFF, w)]


def read_config_file(path: str | Path) -> dict:
    """Read a JSON config file into a dict of overrides: its keys and each value checked here, naming the file;
    values refused only together (``ValuesTogether``) when merged, where a later file or a flag may change one."""
    path = Path(path)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {why}")
    try:  # a byte-order mark (some Windows editors write one) is dropped
        values = parse_json(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys,
                            parse_float=_float)
    except DuplicateKey as err:
        raise ConfigError(f"{path}: key {err} appears twice; which value was meant?") from None
    except FloatRange as err:
        shown, value = err.args
        raise ConfigError(f"{path}: the number {shown} is beyond what a float holds (it would be read as "
                          f"{value}); no config value is near it") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (at byte offset {err.start}), so not JSON") from None
    except ValueError as err:  # valid JSON, but nested too deep or an integer of over 4300 digits
        if "integer string conversion" not in str(err):
            raise ConfigError(f"{path}: not valid JSON ({error_line(err)})") from None
        raise ConfigError(f"{path}: an integer of more than {sys.get_int_max_str_digits()} digits, far more than "
                          "any config value takes") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
    try:  # validates keys and values; no path (nor any other string here) may hold a NUL
        if nul := [k for k, v in values.items() if isinstance(v, str) and "\0" in v]:
            raise ConfigError(f"{nul[0]}={values[nul[0]]!r}: a NUL character, which no path can hold")
        Config.from_dict(values, source=str(path))
    except ValuesTogether:
        pass  # (every single value was checked before this)
    except ConfigError as err:
        raise ConfigError(str(err) if str(err).startswith(f"{path}: ") else f"{path}: {err}") from None
    return values


class DuplicateKey(ValueError):
    pass


class FloatRange(ValueError):
    pass


def _float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused where a float cannot hold it: 1e400 would be
    read as inf and 1e-400 as 0.0, and a message would then name a value the file does not hold."""
    value = float(text)
    if beyond_float(text, value):
        raise FloatRange(text[:40] + ("..." if len(text) > 40 else ""), value)
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different (``json`` keeps the last of two silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(repr(key))
        out[key] = value
    return out
