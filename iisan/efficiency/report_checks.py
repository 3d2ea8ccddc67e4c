"""Reading a benchmark JSON (``benchmark.run_benchmark``'s) for its table and figure: every field they read
is checked for its presence and type first, so that a damaged or hand-edited file is refused in one line
naming the file and the field, before anything is written, never a traceback halfway through."""

from __future__ import annotations

import json
from pathlib import Path

from ..bounds import finite_number
from ..errors import DataError, parse_json

# What the table and the figure read from a benchmark JSON, besides its rows.
BENCHMARK_KEYS = ("rows", "device", "description", "timed_steps", "warmup_steps", "command", "git_commit",
                  "backbones", "data")
EXPECTED = "expected a benchmark JSON written by scripts/benchmark_efficiency.py"

TEXT, INTEGER, NUMBER, FLAG, TABLE = "text", "an integer", "a finite number", "true or false", "an object"
# field -> kind: required fields, then fields read only where present (None allowed where marked "or null")
PAYLOAD = {"device": TEXT, "description": TEXT, "timed_steps": INTEGER, "warmup_steps": INTEGER, "command": TEXT,
           "git_commit": TEXT, "backbones": TEXT, "data": TEXT}
PAYLOAD_OPTIONAL = {"complete": FLAG, "evaluation": TABLE + " or null", "cache_build": TABLE + " or null"}
ROW = {"label": TEXT, "method": TEXT, "batch_size": INTEGER, "seconds_per_step": NUMBER, "epoch_seconds": NUMBER,
       "trainable_params": INTEGER, "memory": TABLE}
ROW_OPTIONAL = {"encodes": TEXT, "items_per_step": NUMBER, "encoded_rows_per_step": NUMBER,
                "padding_overhead_items": NUMBER + " or null", "padding_overhead_flops": NUMBER + " or null",
                "p90_seconds_per_step": NUMBER, "full_epoch_seconds": NUMBER, "model_tflops_per_second": NUMBER,
                "tpme": NUMBER, "step_seconds": TABLE, "static_shapes": FLAG, "buckets": TABLE + " or null",
                "measured": TEXT, "feed": TEXT, "flop_batches": INTEGER, "distinct_items_per_step": NUMBER,
                "distinct_rows_per_step": NUMBER, "distinct_padding_overhead_items": NUMBER}
BY_ITEM = ("distinct_items_per_step", "distinct_rows_per_step")  # read together (a row of towers by item)
FAILED_ROW = {"label": TEXT, "error": TEXT}
BUCKETS_OPTIONAL = {"title_multiple": INTEGER, "title_tokens": INTEGER}
GPU_MEMORY = {"max_allocated_gib": NUMBER, "max_reserved_gib": NUMBER}
CPU_MEMORY = {"peak_rss_gib": NUMBER}
CPU_MEMORY_OPTIONAL = {"rss_peak_source": TEXT, "rss_peak_since": TEXT}
EVALUATION = {"label": TEXT, "users": INTEGER, "items": INTEGER, "evaluation_seconds": NUMBER,
              "p90_evaluation_seconds": NUMBER, "memory": TABLE}
EVALUATION_OPTIONAL = {"evaluation_times": TABLE}
EVALUATION_TIMES_OPTIONAL = {"count": INTEGER}  # how many runs the median is of
CACHE_BUILD = {"cache_build_seconds": NUMBER, "memory": TABLE}
CACHE_BUILD_OPTIONAL = {"load_seconds": NUMBER, "encode_seconds": NUMBER, "assemble_seconds": NUMBER,
                        "cache_dtype": TEXT}
FAILED_TASK_OPTIONAL = {"error": TEXT}


def is_kind(value, kind: str) -> bool:
    if value is None:
        return kind.endswith(" or null")
    kind = kind.removesuffix(" or null")
    if kind == TEXT:
        return isinstance(value, str)
    if kind == FLAG:
        return isinstance(value, bool)
    if kind == TABLE:
        return isinstance(value, dict)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    return finite_number(value)


def check(path: Path, where: str, entry: dict, required: dict, optional: dict | None = None) -> None:
    """A ``DataError`` naming the file and ``where.field`` for a field of ``required`` that ``entry`` lacks, or
    one of ``required`` or ``optional`` of another type than listed."""
    for fields, needed in ((required, True), (optional or {}, False)):
        for name, kind in fields.items():
            if name not in entry:
                if needed:
                    raise DataError(f"{path}: {where}{name} is missing; {EXPECTED}")
                continue
            if not is_kind(entry[name], kind):
                raise DataError(f"{path}: {where}{name} is {json.dumps(entry[name])[:40]}, not {kind}; "
                                f"{EXPECTED}")


def check_memory(path: Path, where: str, memory: dict) -> str:
    """'gpu' or 'cpu', after checking the figures of that kind."""
    if "max_allocated_gib" in memory:
        check(path, where, memory, GPU_MEMORY)
        return "gpu"
    check(path, where, memory, CPU_MEMORY, CPU_MEMORY_OPTIONAL)
    return "cpu"


def check_rows(path: Path, rows: list) -> None:
    kinds = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: rows[{i}] is {json.dumps(row)[:40]}, not {TABLE}; {EXPECTED}")
        label = f" ({row['label']})" if isinstance(row.get("label"), str) else ""
        where = f"rows[{i}]{label}."
        if "error" in row:
            check(path, where, row, FAILED_ROW)
            continue
        check(path, where, row, ROW, ROW_OPTIONAL)
        if (given := [k for k in BY_ITEM if k in row]) and len(given) < len(BY_ITEM):
            missing = next(k for k in BY_ITEM if k not in row)
            raise DataError(f"{path}: {where}{missing} is missing beside {given[0]}; {EXPECTED}")
        kinds.add(check_memory(path, where + "memory.", row["memory"]))
        if isinstance(row.get("buckets"), dict):
            check(path, where + "buckets.", row["buckets"], {}, BUCKETS_OPTIONAL)
    if len(kinds) > 1:
        raise DataError(f"{path}: its rows mix GPU and CPU memory figures; {EXPECTED}")


def check_tasks(path: Path, payload: dict) -> None:
    """The evaluation and the cache build: measured (their figures checked), failed, or absent."""
    for key, measured, required, optional in (("evaluation", "evaluation_seconds", EVALUATION, EVALUATION_OPTIONAL),
                                              ("cache_build", "cache_build_seconds", CACHE_BUILD,
                                               CACHE_BUILD_OPTIONAL)):
        task = payload.get(key) or {}
        if measured in task:
            check(path, f"{key}.", task, required, optional)
            check_memory(path, f"{key}.memory.", task["memory"])
            if isinstance(task.get("evaluation_times"), dict):
                check(path, f"{key}.evaluation_times.", task["evaluation_times"], {}, EVALUATION_TIMES_OPTIONAL)
        else:
            check(path, f"{key}.", task, {}, FAILED_TASK_OPTIONAL)


def read_benchmark(path: Path) -> dict:
    """A benchmark JSON with every field its table and figure read, or a ``DataError`` naming the file and
    what it is not (the first field at fault)."""
    try:
        payload = parse_json(path.read_bytes())
    except ValueError as err:  # not JSON (cut short, another format, nested too deep)
        raise DataError(f"{path} is not JSON ({err}); {EXPECTED}") from None
    missing = [k for k in BENCHMARK_KEYS if k not in payload] if isinstance(payload, dict) else list(BENCHMARK_KEYS)
    if missing or not isinstance(payload["rows"], list):
        raise DataError(f"{path} is not a benchmark JSON (it lacks {', '.join(missing) or 'a list of rows'}); "
                        f"{EXPECTED}")
    if not payload["rows"]:  # the benchmark writes a file once it has measured a row
        raise DataError(f"{path} holds no rows (a benchmark JSON has one per method measured); {EXPECTED}")
    check(path, "", payload, PAYLOAD, PAYLOAD_OPTIONAL)
    check_rows(path, payload["rows"])
    check_tasks(path, payload)
    return payload
