"""Entry scripts as data: defaults plus editable sweep lists, run as a grid in-process (never shell strings).

A script calls ``run_script(defaults, SWEEP)``. Every Config key is a flag; a swept key accepts several
values (``--lr 1e-4 2e-4``). ``--dataset`` picks one of the paper's data sets under ``Dataset/``.

Precedence (``precedence.resolve``): flags > ``--config`` file > the SWEEP lists > the script's own defaults
(data-set paths, presets) > the method's paper defaults > Config defaults. A swept key given as a flag
replaces the script's list with the flag's values; given in the config file, with the file's one value.
Folder names and ``config.json`` come from the resolved values. A script's own method replaced (``--method``)
keeps the script's settings over the new method's paper ones, said in a warning (``methods.kept_over``).

A grid point that fails (a bad value, a non-finite loss) is logged with its one-line reason and the
grid goes on; a summary lists every point at the end, and the exit status is 2 when any point failed.
Without ``--run-name`` a point's folder is named from its resolved config (``train.runfolder``), so
running the same command again resumes unfinished points and skips finished ones. ``--list-grid``
prints the points; ``--grid-index I`` runs point I alone (a Slurm array task, one process per GPU).
Training and run folders (torch, transformers: seconds to import) are imported where a grid is listed or
run, so that a script's ``--help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import logging
import sys
import time
from pathlib import Path

from ..console import VERBOSE_HELP, entry_point, setup_logging
from ..data.datasets import DATASETS, FETCHABLE, dataset_paths
from ..errors import ConfigError, DataError, GridError, RunInterrupted, RunInUse, TrainingError, UserError
from ..files import path_component
from ..flags import FlagParser, add_config_arguments, args_layers
from ..methods import MAY_CHANGE, METHOD_DEFAULTS, kept_over, unread_keys
from ..precedence import resolve
from ..system_errors import peer_lost
from .grid import GridPoint, Outcome, Status, disk_short, folder_bytes, listing, summary, time_left, values_text
from .presets import BACKBONES, own_cache_dir

log = logging.getLogger(__name__)

PATH_KEYS = ("users", "items", "images", "cache_dir")  # set by --dataset


def grid(sweep: dict[str, list]) -> list[dict]:
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def script_parser(defaults: dict, sweep: dict[str, list], description: str = "",
                  extra_arguments=None, add_help: bool = True, listed=None) -> argparse.ArgumentParser:
    """The flags of an entry script; its ``--help`` shows the SWEEP lists, the script's own defaults
    and the method's paper defaults as the defaults; only the Config keys in ``listed``, if given."""
    parser = FlagParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                        several_values="add its key to this script's SWEEP list to run several", add_help=add_help)
    if extra_arguments is not None:
        extra_arguments(parser)
    parser.add_argument("--dataset", default="Scientific", choices=sorted(DATASETS),
                        help="one of the paper's data sets under Dataset/ (sets users, items, images, cache-dir) "
                             "(default: Scientific)")
    parser.add_argument("--list-grid", action="store_true",
                        help="print the grid's points (index, run folder, values) and exit")
    parser.add_argument("--grid-index", type=int, default=None, metavar="I",
                        help="run only point I of the grid (0-based, see --list-grid), e.g. a Slurm array task id")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # what the script's method runs with where methods differ (FFT's adapter rates; a baseline's feed is live)
    resolved = resolve({k: v for k, v in defaults.items() if k not in PATH_KEYS}).to_dict()
    by_method = {k: resolved[k] for k in ("feed", *(k for values in METHOD_DEFAULTS.values() for k in values))}
    shown = {**by_method, **defaults,
             **dict.fromkeys([k for k in PATH_KEYS if k not in defaults], "set by --dataset"),
             **{k: " ".join(map(str, values)) + " (SWEEP)" for k, values in sweep.items()}}
    add_config_arguments(parser, shown, multi=set(sweep), shown=listed)
    return parser


def parse_script_args(defaults, sweep: dict[str, list], argv: list[str] | None = None,
                      description: str = "", extra_arguments=None,
                      listed=None) -> tuple[list[GridPoint], argparse.Namespace]:
    """Parse the command line into the grid's points, each with its resolved config (or its error).
    ``defaults``: the script's, or a function of the command line that gives them (run_IISAN_Versa.py's)."""
    if callable(defaults):
        defaults = defaults(argv)
    args = script_parser(defaults, sweep, description, extra_arguments, listed=listed).parse_args(argv)
    file_values, flags = args_layers(args)
    base = {**BACKBONES, **dataset_paths(args.dataset), **defaults}
    own = defaults.get("method")  # an entry script's; flags and config files win over it, said once
    if own and (method := (given := {**file_values, **flags}).get("method", own)) not in (own, [own]):
        log.warning("this entry script runs method=%s; the method=%s given replaces it%s", own, method,
                    kept_over(method, {**defaults, **sweep}, given))
    if "items" in given and "cache_dir" not in given and "cache_dir" in base:
        base["cache_dir"] = own_cache_dir(base["cache_dir"], given["items"], args.dataset)  # other items' own
    swept, from_flags = {}, set()
    for key, values in sweep.items():
        if key in flags:
            swept[key] = list(dict.fromkeys(flags.pop(key)))  # a value given twice is one point, not two
            from_flags.add(key)
        else:
            swept[key] = [file_values[key]] if key in file_values else list(values)
    if shared := [k for k, v in swept.items() if k in MAY_CHANGE and len(v) > 1]:
        key = shared[0]
        raise ConfigError(f"--{key.replace('_', '-')} {' '.join(map(str, swept[key]))}: runs that differ only in "
                          f"{key} are one run (it says how a run goes on, not what it computes: a longer run "
                          "resumes a shorter one in its folder); sweep one value at a time, each with its own "
                          "--run-name")
    from ..train.runnames import folder_names, known_run_name  # imported when run, not for --help (module docstring)

    points, seen, seen_unread = [], set(), set()
    listed = functools.cache(folder_names)  # each out_dir's folders, listed once for the grid (not per point)
    for values in grid(swept):
        try:
            cfg = resolve({**base, **values}, file_values, {**flags, **{k: values[k] for k in from_flags}})
        except ConfigError as err:
            points.append(GridPoint(len(points), values, None, str(err)))
            continue
        values = {k: getattr(cfg, k) for k in values}  # as resolved: 0.001, whether typed 1e-3 or 0.001
        # FFT over lora_rank [4, 8]: one point, as FFT never reads it (--lr 1e-3 0.001: one point too)
        unread = [k for k in values if len(swept[k]) > 1 and k in unread_keys(cfg.method, cfg.towers, cfg.feed)]
        if (key := repr(sorted((k, v) for k, v in values.items() if k not in unread))) in seen:
            if unread and not seen_unread & set(unread):
                log.warning("%s: not read by method=%s (feed=%s, towers=%s); its values are one run", ", ".join(unread),
                            cfg.method, cfg.feed, cfg.towers)
            seen_unread.update(unread)
            continue
        seen.add(key)
        index = len(points)
        varying = "-".join(f"{k}{v}" for k, v in values.items() if len(swept[k]) > 1)
        # One folder per grid point, also under an explicit --run-name: a folder holds one run.
        name = "-".join(filter(None, [cfg.run_name, folder_tag(varying)])) if cfg.run_name else \
            known_run_name(cfg, varying, listed)
        points.append(GridPoint(index, values, cfg.replace(run_name=name)))
    return points, args


def folder_tag(varying: str) -> str:
    """A grid point's varying values as part of a folder name: a swept path (``text_model``) has '/' in it,
    so such a value is made safe, with a digest of the raw text to keep two paths that read alike apart."""
    safe = path_component(varying) if varying else ""
    return safe if safe == varying else f"{safe}-{hashlib.sha256(varying.encode()).hexdigest()[:8]}"


def run_point(point: GridPoint, total: int, action, args, left: str = "") -> Outcome:
    """One grid point; any failure but an interruption becomes the outcome, logged in one line. ``left``: the
    time the grid has left, said after the point (``grid.time_left``)."""
    log.info("grid point %d (%d of %d): %s%s", point.index, point.index + 1, total,
             point.name if point.config or point.made else f"invalid values ({values_text(point.values)})", left)
    if point.error:
        log.error("grid point %d (%s) failed: %s", point.index, values_text(point.values), point.error)
        return Outcome(point, Status.FAILED, reason=point.error)
    try:
        if action is None:
            # imported when run, not for --help (module docstring)
            from ..distributed import joined
            from ..train.runfolder import agreed_results
            from ..train.trainer import train

            done = agreed_results(point.config, joined())  # under torchrun: rank 0's look, for every rank
            if done is not None:
                return Outcome(point, Status.FINISHED_BEFORE, done)
            return Outcome(point, Status.FINISHED, train(point.config, reuse=False))  # asked just now
        return Outcome(point, Status.FINISHED, action(point.config, args))
    except RunInterrupted:
        raise
    except RunInUse as err:  # another process (a second copy of this sweep) is training it: not a failure
        reason = " ".join(str(err).split("; ")[0].split())  # (its hint, another --run-name, is not a sweep's)
        log.warning("grid point %d (%s) skipped: %s", point.index, point.name, reason)
        return Outcome(point, Status.IN_USE, reason=reason)
    except UserError as err:
        reason = " ".join(str(err).split())
        log.error("grid point %d (%s) failed: %s", point.index, point.name, reason)
    except Exception as err:  # a bug: its traceback goes to the log, the grid goes on
        if isinstance(err, RuntimeError) and (line := peer_lost(err)):  # torchrun: no point can go on
            raise TrainingError(line) from None
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        log.error("grid point %d (%s) failed: %s", point.index, point.name, reason, exc_info=True)
    return Outcome(point, Status.FAILED, reason=reason)


def found_finished(point: GridPoint) -> bool:
    """Whether ``point``'s run folder holds its run finished with this config: a quiet first look, for the time
    left (``run_point`` looks again, and says what it found)."""
    # imported when run, not for --help (module docstring)
    from ..train.run_results import read_results
    from ..train.runfolder import RESULTS, finished_results
    from ..train.runnames import run_dir

    try:
        return point.config is not None and \
            finished_results(point.config, read_results(run_dir(point.config) / RESULTS)) is not None
    except Exception:  # a hint only: whatever a look at the folder meets is said when the point runs, or fails it
        return False


def chosen(points: list[GridPoint], index: int | None) -> list[GridPoint]:
    """The points ``--grid-index`` picks: all of them (None), or the one at ``index``, which must be one."""
    if index is None:
        return points
    if not 0 <= index < len(points):
        raise ConfigError(f"--grid-index {index}: the grid has {len(points)} point(s), 0..{len(points) - 1} "
                          "(see --list-grid)")
    return [points[index]]


def run_grid(points: list[GridPoint], args, action=None, made=None) -> list:
    """Run the points one after another; print the summary (also when interrupted); a GridError when
    any point failed. Returns each point's result (None for a failed one). ``made``: see ``run_script``."""
    total = len(points)  # "grid point 1 (2 of 4)" also when --grid-index runs one of them
    points = chosen(points, args.grid_index)
    # imported when run, not for --help (module docstring)
    from ..distributed import launched, main_process, setup, teardown

    outcomes = [Outcome(p, Status.NOT_RUN) for p in points]
    # Under torchrun the points share one process group: made and destroyed per run, gloo's hung or refused
    # to connect within one launch. Each train() joins it and leaves it up.
    first = next((p.config for p in points if p.config is not None), None)
    created = launched() and first is not None and setup(first.device)[2]
    trained: list[float] = []  # seconds of each point trained by this command, for the time left
    kept: list[int] = []  # bytes of each run folder trained by this command, for the disk left
    disk_said = False  # (once)
    done = [action is None and found_finished(p) for p in points]  # (they take none of it)
    try:
        for n, point in enumerate(points):
            try:
                began = time.monotonic()
                outcomes[n] = run_point(point, total, action, args, time_left(trained, len(points) - n - sum(done[n:])))
                if outcomes[n].status is Status.FINISHED:
                    trained.append(time.monotonic() - began)
                    if action is None and main_process() and not disk_said and outcomes[n].result:
                        run = Path(outcomes[n].result["run_dir"])  # (train's results name their folder)
                        kept.append(folder_bytes(run))
                        left = len(points) - n - 1 - sum(done[n + 1:])
                        if warning := disk_short(kept, left, run.parent, point.config.keep_checkpoints):
                            log.warning(warning)
                            disk_said = True
                if launched() and outcomes[n].status == Status.FAILED and point.config is not None:
                    # it may have failed on this rank alone (a write only rank 0 does): the others wait in its
                    # collectives, so no next point can start; this process ends, and theirs with it
                    raise GridError(f"grid point {point.index} ({point.name}) failed: {outcomes[n].reason}; under "
                                    "torchrun a point that fails while training ends the grid: run the same "
                                    "command again once it is fixed (finished points are skipped)")
            except RunInterrupted as err:  # (in a point's last epoch: that point finished all the same)
                finished = err.results is not None
                outcomes[n] = Outcome(point, *((Status.FINISHED, err.results) if finished else (Status.INTERRUPTED,)))
                # the point's run name comes from the grid: rerunning the command finds it again
                hint = "To resume, run the same command again: finished points are skipped, this one goes on from " \
                    "its checkpoint"
                failed = ", ".join(str(o.point.index) for o in outcomes[:n] if o.status == Status.FAILED)
                if finished:  # a point after it waits for the command, run again; after the last, none does
                    hint = "To go on, run the same command again: finished points are skipped" \
                        if n < len(points) - 1 else "It was the grid's last point" + (
                            f"; point(s) {failed} failed before it (the grid summary): run the same command again to "
                            "try them again" if failed else ": none is left to run")
                elif failed:
                    hint += f"; point(s) {failed} failed before it (the grid summary), tried again then"
                raise err.rehinted(hint, f"grid point {point.index}: {err.what}") from None
            except KeyboardInterrupt:  # a second Ctrl-C, while the first was being handled
                outcomes[n] = Outcome(point, Status.INTERRUPTED)
                raise
    finally:
        if main_process():  # under torchrun every rank runs the grid; one table is enough
            print(summary(outcomes, made), end="")
        if created:  # every rank waits for the others only when all went well (a peer may be gone)
            teardown(finished=all(o.status in (Status.FINISHED, Status.FINISHED_BEFORE, Status.IN_USE)
                                  for o in outcomes))
    if busy := sum(o.status == Status.IN_USE for o in outcomes):
        log.info("%d point(s) were being trained by another process: run this command again once it has "
                 "finished to collect their results", busy)
    failed = [o for o in outcomes if o.status == Status.FAILED]
    if failed:  # one failure: its reason here too (a single run's user sees no other line); several: the table
        raise GridError(f"{len(failed)} of {len(outcomes)} grid point(s) failed: " + "; ".join(
            f"{o.point.index} ({o.point.name}: {o.reason})" if o.point.config and len(failed) == 1 else
            f"{o.point.index} ({o.point.name})" if o.point.config else f"{o.point.index} ({o.reason})"
            for o in failed))
    return [o.result for o in outcomes]


def run_script(defaults, sweep: dict[str, list], argv: list[str] | None = None, description: str = "",
               action=None, extra_arguments=None, parallel: bool = True, made=None, listed=None) -> list:
    """Parse, then run ``action(cfg, args)`` (default: train) for every grid point, one after another.
    ``defaults``: as ``parse_script_args`` takes them (a dict, or a function of ``argv``, called in the entry point).
    ``extra_arguments(parser)`` adds script-only flags, which ``action`` reads from ``args``; ``parallel``:
    the action trains data-parallel under torchrun (else torchrun is refused: each rank would do all of it).
    ``made(cfg, result)``, for an action that trains no run (a cache build): what a point makes, named in
    its log lines and the summary instead of a run folder and test metrics; ``result`` is None until made.
    ``listed``: the Config keys ``--help`` lists (the others are taken, and unlisted)."""
    setup_logging()

    def run() -> list:
        points, args = parse_script_args(defaults, sweep, argv, description, extra_arguments, listed)
        setup_logging(args.verbose)
        from ..distributed import launched  # imported when run, not for --help (module docstring)

        if launched() and not parallel:
            raise ConfigError(f"{Path(sys.argv[0]).name} runs in one process: start it without torchrun (RANK is set)")
        for point in points if made else []:
            if point.config is not None:
                point.made = made(point.config, None)
        if args.list_grid:  # every point, or the one --grid-index names
            picked = chosen(points, args.grid_index)
            print(listing(picked, len(points)), end="")
            if invalid := [p for p in picked if p.error]:  # a listing that checks a grid before a job array
                raise GridError(f"{len(invalid)} of {len(picked)} grid point(s) invalid: " + "; ".join(
                    f"{p.index} ({p.error})" for p in invalid))
            return []
        paper = dataset_paths(args.dataset)
        for key in ("users", "items"):  # the data set --dataset names, not yet here: where to get it
            if not Path(paper[key]).exists() and any(p.config and getattr(p.config, key) == paper[key] for p in points):
                how = (f"`iisan fetch data --dataset {args.dataset}` downloads the data set (Dataset/README.md: by "
                       "hand)" if args.dataset in FETCHABLE else "Dataset/README.md says where to get it")
                raise DataError(f"{key} file {paper[key]} does not exist: {how}")
        return run_grid(points, args, action, made)

    return entry_point(sys.argv[0], run)


def run_method(method: str, sweep: dict[str, list], description: str = "", feed: str | None = None) -> list:
    """An entry script for one of the paper's methods: its SWEEP over its paper defaults."""
    return run_script({"method": method, **({"feed": feed} if feed else {})}, sweep, description=description)
