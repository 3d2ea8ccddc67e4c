"""One spelling of each config value, as a run's name hashes it, a resume compares it and a table shows it: a
config keeps the values as given (config.json records them), and two spellings of one value are one setting. A
value a flag takes in another flag's or a record's spelling (``ALIASES``) is stored in the key's own."""

from __future__ import annotations

import codecs
import contextlib

# Values a flag also takes in the spelling another flag or a record uses (results.json's step.amp and `iisan results`
# say bfloat16; --amp says bf16): a config stores the key's own spelling, so a run's name and a resume never see two.
_AS_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ALIASES = {"amp": {"bfloat16": "bf16", "float16": "fp16", "float32": "none", "fp32": "none"},
           "cache_dtype": _AS_DTYPE, "encoder_dtype": _AS_DTYPE, "dtype": _AS_DTYPE}


def own_spelling(key: str, value):
    """``value`` of config key ``key`` in the key's own spelling (``ALIASES``): amp=bfloat16 is amp=bf16."""
    return ALIASES.get(key, {}).get(value, value) if isinstance(value, str) else value


def target_entries(text: str) -> list[str]:
    """The entries of a --lora-targets / --adapter-targets list, blanks and empty entries dropped."""
    return [entry for entry in "".join(text.split()).split(",") if entry]


def one_spelling(values: dict, encodings: bool = True) -> dict:
    """``values`` (a config or some of its keys, a saved one too) with one spelling of each value, as a run's name
    hashes it, a resume compares it and a table shows it: -0.0 is 0.0, "query, value," is query,value, and (unless
    not ``encodings``: the hash of runs named before) an encoding by Python's name for it: latin1 is iso8859-1."""
    def spelt(key: str, value):
        if key in ("lora_targets", "adapter_targets") and isinstance(value, str):
            return ",".join(target_entries(value))
        if key == "encoding" and encodings and isinstance(value, str):
            with contextlib.suppress(LookupError):  # (an unknown one is refused where a config is made)
                return codecs.lookup(value).name
        return 0.0 if isinstance(value, float) and value == 0.0 else value
    return {k: spelt(k, v) for k, v in values.items()}
