"""Subcommands that use a trained run (``experiments.trained``): evaluate, recommend, export."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..bounds import DEVICES, device_choice, finite_number, path_arg, positive_int, utf8_path
from ..console import fixed
from ..data.textfile import decoded_lines
from ..errors import DataError, OutputError
from ..files import json_text
from ..methods import METHOD_NAMES

if TYPE_CHECKING:
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.trained import TrainedRun

log = logging.getLogger(__name__)
SPLITS = ("valid", "test")


def shown_epoch(epoch: int) -> str:
    """A weights file's epoch as said: -1 is a file whose metadata names none (saved again without it)."""
    return str(epoch) if epoch >= 0 else "unknown (the weights file names none)"


def describe(run: TrainedRun) -> str:
    # imported when run, not for --help (cli/__init__.py)
    from ..devices import device_name

    feed = "" if run.cfg.method == "id" else f", {run.cfg.feed} feed"  # no encoder to feed (`iisan results`: '-')
    return (f"{run.run_dir}: {METHOD_NAMES[run.cfg.method]}{feed}, best epoch {shown_epoch(run.best_epoch)}, "
            f"{device_name(run.device)}")


def recorded_metrics(results: dict) -> dict:
    """The valid and test metrics a run's results hold for the best epoch, finite numbers only (a file
    edited by hand, or damaged, may hold others); {} when they hold none."""
    out = {}
    for split in SPLITS:
        values = results.get(split) if isinstance(results.get(split), dict) else {}
        numbers = {m: v for m, v in values.items() if finite_number(v)}
        if numbers:
            out[split] = numbers
    return out


def why_different(run: TrainedRun) -> str:
    """The likeliest reason the numbers moved: a results file of another config (copied from another run),
    weights of another epoch than the results file's (a run still training), another users file than the
    run trained on, a cache rebuilt in another precision (or, for a run that recorded no cache, rebuilt at
    all; or written after the run ended), else the software."""
    # imported when run, not for --help (cli/__init__.py)
    from ..digests import file_fingerprint
    from ..train.checkpoint import PATHS, config_differences

    saved = run.results.get("config")
    if isinstance(saved, dict) and (differ := config_differences(saved, run.cfg.to_dict(), ignore=PATHS)):
        return f"results.json is of another config than the run's config.json ({'; '.join(differ[:2])})"
    if (then := run.results.get("users_fingerprint")) and then != file_fingerprint(run.cfg.users):
        return f"the users file {run.cfg.users} is not the one the run trained on"
    if run.results.get("best_epoch") != run.best_epoch:
        return (f"results.json is of best epoch {run.results.get('best_epoch')}, the weights of "
                f"{shown_epoch(run.best_epoch)}")
    step = run.results.get("step")
    trained_on = (step.get("cache_dtypes") if isinstance(step, dict) else None) or {}
    now = run.model.cache_dtypes()
    changed = [f"{m} {trained_on[m]} then, {now[m]} now" for m in now if m in trained_on and trained_on[m] != now[m]]
    if changed:
        return f"the cache was rebuilt in another precision ({'; '.join(changed)})"
    if run.cfg.cached and "cache" not in run.results:
        return "a cache rebuilt since? (this run, of an older version, recorded none to compare) or another " \
               "device or library version?"
    if run.cfg.cached and (rewritten := written_since(run)):
        return f"{rewritten} was written after the run's results.json: a cache built again (a GPU build's last " \
               "bits vary) or another device or library version?"
    return "another device or library version?"


def written_since(run: TrainedRun) -> str:
    """A cache file of ``run`` newer than its results.json (the same settings built again, which the cache's
    record cannot tell apart), or ''."""
    # imported when run, not for --help (cli/__init__.py)
    from ..data.cache import cache_file
    from ..model.build import modalities

    try:
        ended = (run.run_dir / "results.json").stat().st_mtime
        return next((str(path) for m in modalities(run.cfg)
                     if (path := cache_file(run.cfg.cache_dir, m)).stat().st_mtime > ended), "")
    except OSError:
        return ""


def ran(run_dir: str) -> None:
    """A run folder that is not there, said before torch loads to read it (seconds)."""
    from ..experiments.results_file import check_run_folder  # (light: what `iisan results` reads with)

    check_run_folder(Path(run_dir))


def cmd_evaluate(args) -> None:
    ran(args.run_dir)
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.trained import evaluate, load_run

    run = load_run(args.run_dir, args.device, progress=args.progress)
    splits = [args.split] if args.split else list(SPLITS)
    metrics = {split: evaluate(run, split) for split in splits}
    verdict = compared(run, metrics)
    if args.json:
        print(json_text(metrics))
        if verdict.startswith("results.json differs"):  # (on stderr: stdout stays one JSON object)
            log.warning("%s: %s", run.run_dir, verdict)
        return
    print(describe(run))
    metric_names = list(metrics[splits[0]])  # hit@5, ndcg@5, hit@10, ...
    print(f"{'split':<6}" + "".join(f"{m:>10}" for m in metric_names))
    for split, values in metrics.items():
        print(f"{split:<6}" + "".join(f"{fixed(values[m]):>10}" for m in metric_names))
    print(verdict)


def compared(run: TrainedRun, metrics: dict[str, dict[str, float]]) -> str:
    """What ``metrics`` are to the run's results.json numbers, in a line (the last digits of a mean summed in
    another order, by an earlier version, are said as such: no cause is guessed for them)."""
    saved = recorded_metrics(run.results)
    pairs = [(s, m) for s in metrics for m in metrics[s] if m in saved.get(s, {})]
    total = sum(len(values) for values in metrics.values())
    some = f" ({len(pairs)} of the {total} numbers: results.json holds no number for the others)" \
        if len(pairs) < total else ""
    if not (run.run_dir / "results.json").exists():
        return ("no results.json to compare with (an older IISAN version wrote it when a run finished: this one may "
                "have stopped; its command, run again, resumes it)")
    if not pairs:
        return "results.json holds no metrics to compare with"
    worst = max(abs(metrics[s][m] - saved[s][m]) for s, m in pairs)
    splits = ", ".join(dict.fromkeys(s for s, _ in pairs))
    if worst == 0:
        return f"results.json: the same numbers ({splits}){some}"
    if worst < 1e-12:
        return f"results.json: the same numbers to 12 decimal places ({splits}; largest difference {worst:.1e}){some}"
    return f"results.json differs: largest difference {worst:.2e} ({why_different(run)}){some}"


def queries(run: TrainedRun, args) -> list[tuple[str, object]]:
    """``(label, history)`` for ``--user``, every line of ``--users-file`` or ``--history``."""
    if args.user is not None:
        return [(f"user {args.user}", run.user_history(args.user))]
    if args.history is not None:
        ids = [i.strip() for i in args.history.split(",")]
        if ids[-1] == "" and len(ids) > 1:
            ids.pop()  # a trailing comma ends the list
        if "" in ids and any(ids):  # "a,,b": an id left out between two commas is not passed over
            raise DataError(f"--history {args.history!r}: item {ids.index('') + 1} is empty; give item ids "
                            "separated by single commas")
        ids = [i for i in ids if i]
        return [("history " + ",".join(ids), run.item_index(ids))]
    path = Path(args.users_file)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"--users-file {path} {what}; expected a file of user ids, one per line")
    out = []
    for lineno, line in decoded_lines(path):  # UTF-8, a byte-order mark dropped, as the data files
        user = line.split("\t")[0].strip()  # one user id per line; a users TSV works too
        if user:
            out.append((f"user {user}", run.user_history(user, where=f"{path}:{lineno}")))
    if not out:
        raise DataError(f"--users-file {path} holds no user ids (one per line)")
    return out


def cmd_recommend(args) -> None:
    ran(args.run_dir)
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.trained import load_run, recommend

    run = load_run(args.run_dir, args.device, progress=args.progress)
    asked = queries(run, args)
    results = recommend(run, [history for _, history in asked], args.k)
    ids, titles = run.data.item_ids, run.data.titles
    for (label, history), top in zip(asked, results, strict=True):
        if args.json:
            print(json_text({"query": label, "history": [ids[i] for i in history],
                              "items": [{"item_id": ids[i], "title": titles[i], "score": s} for i, s in top]}))
            continue
        last = history[-1]
        n = len(history)
        print(f"{label}: {n} interaction{'s' * (n != 1)} in the history (its items masked), the last {ids[last]} "
              f"({titles[last]})")
        print(f"{'rank':>4}  {'item':<14}{'score':>10}  title")
        for rank, (i, score) in enumerate(top, 1):
            print(f"{rank:>4}  {ids[i]:<14}{score:>10.4f}  {titles[i]}")
        if len(top) < args.k:
            all_there = "1 item is all there is" if len(top) == 1 else f"{len(top)} items are all there are"
            print(f"(-k {args.k}: {all_there} to rank here; the history's are masked)")


def cmd_export(args) -> None:
    ran(args.run_dir)
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.exports import export
    from ..experiments.trained import load_run

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise OutputError(f"--out {args.out} is a file, expected a folder (made if absent) for the embeddings")
    run = load_run(args.run_dir, args.device, progress=args.progress)
    paths = export(run, args.out, args.split)
    print(describe(run))
    print(f"items: {paths['items']} ({run.data.num_items} x {run.cfg.embedding_dim}, rows in the order of the "
          "metadata's item_ids)")
    print(f"users: {paths['users']} ({run.data.num_users} x {run.cfg.embedding_dim}, before each user's "
          f"{args.split} target; rows in the order of the metadata's user_ids)")


def add_use_commands(sub) -> None:
    def common(p):
        p.add_argument("run_dir", type=path_arg, help="a run folder (config.json and best.safetensors)")
        p.add_argument("--device", type=device_choice, default="auto", help=f"{DEVICES} (default: auto)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bars on a terminal, a line every 30 s in a log (default: on, whatever the "
                            "run trained with)")

    p = sub.add_parser("evaluate", help="rebuild a trained run's model, load its best weights and evaluate "
                                        "(the numbers of its results.json)")
    common(p)
    p.add_argument("--split", choices=SPLITS, default=None, help="one split (default: both)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-K items of a trained run for users of the data set or a history")
    common(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--user", default=None, help="a user id of the data set: after their whole history "
                                                      "(every item of it masked)")
    source.add_argument("--users-file", type=path_arg, default=None, help="a file of user ids, one per line")
    source.add_argument("--history", default=None, help="item ids, oldest first, comma-separated (any history)")
    p.add_argument("-k", type=positive_int, default=10, help="how many items (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per user or history")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("export", help="item embeddings and users' embeddings of a trained run (safetensors)")
    common(p)
    p.add_argument("--out", type=utf8_path, required=True,
                   help="folder for items.safetensors and users-<split>.safetensors")
    p.add_argument("--split", choices=SPLITS, default="test", help="whose user vectors: before the valid or the "
                                                                    "test target (default: test)")
    p.set_defaults(func=cmd_export)
