"""Do commits of this repository give the same numbers, and which commit changed them? Runs each commit's own
`iisan demo` (synthetic data, tiny random encoders, cached IISAN) on one CPU thread, where a seeded run gives the
same bits every time, and compares every epoch's loss and metrics and the best epoch's, as exact floats. It runs
the code of every commit it is given: name only commits you trust.

    python scripts/numbers_by_commit.py 7c7ec25 HEAD             # each commit's numbers, against the first's
    python scripts/numbers_by_commit.py --bisect 7c7ec25 HEAD    # the first commit after 7c7ec25 that changed them
    python scripts/numbers_by_commit.py --live fft,lora main HEAD   # and two live baselines, 2 x 12 steps each

A commit's numbers are kept in --work with the environment they came from (numbers-<commit>.json; its runs' output
in demo-<commit>.log), so no commit runs twice in one environment. A commit takes about 20 s, and 25 s more per
live method (2026 AMD EPYC core). Exit status 1 when a commit's numbers differ from the first's or a commit's runs
fail (a refactor that should keep them: `python scripts/numbers_by_commit.py main HEAD`). Needs git.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import int_in, path_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.experiments.commits import LIVE, LIVE_STEPS  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def methods(text: str) -> tuple[str, ...]:
    named = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not named or not set(named) <= set(LIVE):
        raise argparse.ArgumentTypeError(f"{text!r}: expected methods among {','.join(LIVE)}, comma-separated")
    return named


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("commits", nargs="*", metavar="COMMIT",
                        help="commits to run (hashes, branches, HEAD~3), each compared with the first")
    parser.add_argument("--bisect", nargs=2, metavar=("OLD", "NEW"),
                        help="the first commit after OLD, along NEW's first parents, whose numbers differ from OLD's "
                             "(about log2 of the commits between them are run; a commit whose runs fail is skipped, "
                             "as git bisect skip does)")
    parser.add_argument("--live", type=methods, default=(), metavar="M,M",
                        help=f"also train these methods (comma-separated: {','.join(LIVE)}) on the live feed from "
                             f"each commit's demo config ({' '.join(LIVE_STEPS)}) and compare theirs too")
    parser.add_argument("--repo", type=path_arg, default=str(ROOT), help="the git checkout (default: this one)")
    parser.add_argument("--work", "--work-dir", type=path_arg, default=str(ROOT / "bench_data" / "commits"),
                        help="numbers and logs of each commit's run (default: bench_data/commits)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help="the JSON of every commit run by this call (default: --work's numbers.json)")
    parser.add_argument("--timeout", type=int_in(1, 86_400), default=1800,
                        help="seconds each run of a commit (its demo, each live method) may take (default: 1800)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if bool(args.commits) == bool(args.bisect):
        parser().error("give COMMIT ... or --bisect OLD NEW (one of the two)")
    setup_logging(args.verbose)
    return entry_point(sys.argv[0], lambda: compare(args), interrupted=f"interrupted; the numbers of the commits "
                       f"run so far are kept in {args.work} and are not run again")


def compare(args) -> int:
    from iisan.experiments.commits import Outcomes, first_change, first_parent_line, resolve, summary_line

    repo, work = Path(args.repo), Path(args.work)
    commits = [resolve(repo, name) for name in args.bisect or args.commits]  # (before anything is made)
    line = first_parent_line(repo, *commits) if args.bisect else []
    outcomes = Outcomes(repo, work, Path(args.out or work / "numbers.json"), args.timeout, args.live)
    if args.bisect:
        old, new = commits
        base = outcomes.numbers(old)
        outcomes.numbers(new)  # (a failure of either end is an error: nothing to compare with)
        changed, failed = first_change(line, base, lambda commit: outcomes.outcome(commit).get("numbers"))
        print(summary_line(outcomes.outcome(old), None))
        if changed is None:
            print(f"\n{new[:12]} gives {old[:12]}'s numbers ({len(line)} commits after it; a change made and undone "
                  "between them would not show: name commits to see them)")
            return 0
        print(f"\nthe first commit whose numbers differ (of {len(line)} after {old[:12]}; {len(outcomes.rows)} "
              f"looked at, {outcomes.ran} of them run now):\n" + summary_line(outcomes.outcome(changed), base))
        if failed:
            print(f"\nor one of the {len(failed)} commit(s) just before it, whose runs failed (their numbers are "
                  f"unknown; logs in {work}): " + ", ".join(commit[:12] for commit in failed))
        return 0
    base = outcomes.numbers(commits[0])
    differ = False
    for commit in commits:
        row = outcomes.outcome(commit)
        print(summary_line(row, None if commit == commits[0] else base))
        differ |= row.get("numbers") != base
    print(f"\n{outcomes.out}")
    return int(differ)


if __name__ == "__main__":
    sys.exit(main())
