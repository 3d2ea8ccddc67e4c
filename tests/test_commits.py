"""scripts/numbers_by_commit.py and iisan.experiments.commits: which commit changed a seeded run's numbers.
The git tests run a stand-in ``iisan demo`` (a few lines that write a run folder from a number the commit holds),
so each commit's run takes a Python start, not a training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from iisan.errors import DataError
from iisan.experiments.commits import differences, first_change, run_numbers

from ._scripts import load_script

numbers_by_commit = load_script("numbers_by_commit.py")

FAKE_DEMO = """\
import json, sys, time
from pathlib import Path
import os
args = sys.argv[1:]
value = float(Path(__file__).with_name("value.txt").read_text())
if value < 0 or os.environ.get("OMP_NUM_THREADS") != "1":
    sys.exit("the demo broke")
if value == 9:
    time.sleep(30)
if args[0] == "train":  # a live method from the demo's config: ten times the demo's numbers
    assert Path(args[args.index("--config") + 1]).is_file() and "--feed" in args
    run, value = Path(args[args.index("--out-dir") + 1]) / args[args.index("--run-name") + 1], 10 * value
else:
    run = Path(args[args.index("--out") + 1]) / "runs" / "demo-seed0"
run.mkdir(parents=True)
(run / "config.json").write_text("{}")
if value == 7:  # a second run folder: which one holds the demo's numbers?
    (run.parent / "other").mkdir()
    (run.parent / "other" / "results.json").write_text("{}")
results = {"best_epoch": 0, "valid": {"hit@10": value}, "test": {"hit@10": value / 2},
           "epochs": [{"epoch": 0, "loss": 2 * value, "train_seconds": time.time()}]}
(run / "results.json").write_text(json.dumps(results))
"""


def test_first_change_halves_the_line_down_to_the_commit_that_changed():
    line = [f"c{i}" for i in range(1, 11)]
    for changed_at in range(10):
        asked = []

        def numbers_of(commit, changed_at=changed_at, asked=asked):
            asked.append(commit)
            return {"v": 1.0 if line.index(commit) < changed_at else 2.0}

        assert first_change(line, {"v": 1.0}, numbers_of) == (line[changed_at], [])
        assert len(asked) <= 5  # the last one, then log2(10) rounded up
    asked = []
    assert first_change(line, {"v": 1.0}, lambda c: asked.append(c) or {"v": 1.0}) == (None, []) and asked == ["c10"]
    assert first_change([], {"v": 1.0}, lambda c: pytest.fail("nothing to run")) == (None, [])


@pytest.mark.parametrize("changed_at, failing, expected", [
    (6, {"c3", "c5"}, ("c7", [])),  # failures away from the change: skipped, the change found exactly
    (6, {"c5", "c6"}, ("c7", ["c5", "c6"])),  # just before it: one of the three
    (0, {"c1", "c2"}, ("c3", ["c1", "c2"])),
    (9, {"c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"}, ("c10", ["c1", "c2", "c3", "c4", "c5", "c6", "c7",
                                                                        "c8", "c9"])),
])
def test_first_change_skips_commits_whose_runs_fail(changed_at, failing, expected):
    """As ``git bisect skip``: a middle commit whose runs fail stopped the whole bisection."""
    line = [f"c{i}" for i in range(1, 11)]

    def numbers_of(commit):
        return None if commit in failing else {"v": 1.0 if line.index(commit) < changed_at else 2.0}

    assert first_change(line, {"v": 1.0}, numbers_of) == expected


def test_differences_say_where_in_the_order_computed():
    before = {"best_epoch": 3, "valid": {"hit@10": 0.5},
              "epochs": [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}]}
    after = {"best_epoch": 4, "valid": {"hit@10": 0.5},
             "epochs": [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.25}]}
    assert differences(before, after) == ["best_epoch: 3 -> 4", "epoch 1 loss: 1.5 -> 1.25"]
    assert differences({"demo": before}, {"demo": after}, most=1) == ["demo best_epoch: 3 -> 4"]
    assert differences(before, before) == []
    assert differences({"a": 1}, {"a": 1, "b": None}) == ["b: (absent) -> None"]
    longer = {**before, "epochs": before["epochs"] + [{"epoch": 2, "loss": 1.0}]}
    assert differences(before, longer) == ["epochs: 2 -> 3 entries"]
    assert len(differences({"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 2, "b": 2, "c": 2, "d": 2}, most=2)) == 2


def test_a_runs_numbers_leave_out_its_timings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    epoch = {"epoch": 0, "loss": 3.5, "steps": 4, "train_seconds": 1.2, "valid": {"m": 0.1},
             "ended_at": "2026-12-07 10:00:00 +0000"}
    results = {"best_epoch": 1, "valid": {"m": 0.25}, "test": {"m": 0.125}, "epochs": [epoch],
               "timing": {"train_seconds": 9.5}, "run_dir": "x"}
    (run / "results.json").write_text(json.dumps(results))
    assert run_numbers(run) == {"best_epoch": 1, "valid": {"m": 0.25}, "test": {"m": 0.125},
                                "epochs": [{"epoch": 0, "loss": 3.5, "steps": 4, "valid": {"m": 0.1}}]}
    for broken in ({**results, "epochs": 3}, {**results, "epochs": [[1, 2]]}, [1, 2]):
        (run / "results.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match=r"run/results\.json: not a finished run's results \("):
            run_numbers(run)


def commit(repo: Path, value: str | None, message: str) -> str:
    if value is not None:
        (repo / "iisan" / "value.txt").write_text(value)
    (repo / "notes.txt").write_text(message)
    git = ["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", message], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def fake_repo(repo: Path) -> Path:
    """A git repository at ``repo`` whose ``iisan`` runs ``FAKE_DEMO``; no commit yet."""
    (repo / "iisan").mkdir(parents=True)
    (repo / "iisan" / "__init__.py").write_text("")
    (repo / "iisan" / "__main__.py").write_text(FAKE_DEMO)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return repo


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Eight commits: the numbers change at the third; the sixth's demo fails, the seventh's takes 30 s and the
    eighth's leaves two run folders."""
    repo = fake_repo(tmp_path_factory.mktemp("history") / "repo")
    commits = [commit(repo, "0.5", "first"), commit(repo, None, "a refactor"), commit(repo, "0.25", "a change"),
               commit(repo, None, "docs"), commit(repo, None, "more docs"), commit(repo, "-1", "broken"),
               commit(repo, "9", "slow"), commit(repo, "7", "two runs")]
    return repo, commits


def test_bisect_names_the_commit_that_changed_the_numbers_and_runs_none_twice(history, tmp_path, capsys):
    repo, commits = history
    work = tmp_path / "work"
    assert numbers_by_commit.main(["--bisect", commits[0], commits[4], "--repo", str(repo), "--work", str(work)]) == 0
    out = capsys.readouterr().out
    short = commits[2][:7]
    assert f"first commit whose numbers differ (of 4 after {commits[0][:12]};" in out
    assert out.split("first commit whose numbers differ")[1].splitlines()[1].startswith(f"{short} ")
    assert "other numbers (demo): demo epoch 0 loss: 1.0 -> 0.5; demo valid hit@10: 0.5 -> 0.25; demo test hit@10: " \
           "0.25 -> 0.125" in out
    ran = sorted(p.name for p in work.glob("demo-*.log"))
    assert len(ran) <= 4 and all(work.joinpath(f"numbers-{c}.json").is_file() for c in (commits[0], commits[2]))
    written = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert numbers_by_commit.main([commits[0], commits[2], "--repo", str(repo), "--work", str(work)]) == 1
    kept = {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.name != "numbers.json"}
    assert all(kept[name] == written[name] for name in kept if name in written)  # nothing ran again
    saved = json.loads((work / "numbers.json").read_text())
    assert [row["full"] for row in saved["rows"]] == [commits[0], commits[2]] and saved["environment"]["threads"] == 1
    assert not [p for p in work.iterdir() if p.name.startswith(("demo-", ".")) and p.is_dir()]  # scratch removed


def test_the_same_numbers_exit_zero_and_a_failed_demo_is_named(history, tmp_path, capsys):
    repo, commits = history
    work = tmp_path / "work"
    assert numbers_by_commit.main([commits[0], commits[1], "--repo", str(repo), "--work", str(work)]) == 0
    assert "\n    the same numbers\n" in capsys.readouterr().out
    assert numbers_by_commit.main(["--bisect", commits[0], commits[1], "--repo", str(repo), "--work", str(work)]) == 0
    assert f"{commits[1][:12]} gives {commits[0][:12]}'s numbers (1 commits after it;" in capsys.readouterr().out
    assert numbers_by_commit.main([commits[0], commits[5], "--repo", str(repo), "--work", str(work)]) == 1
    assert "failed: iisan demo: exit status 1: the demo broke" in capsys.readouterr().out
    assert not (work / f"numbers-{commits[5]}.json").exists()  # a failure is tried again next time
    with pytest.raises(SystemExit):
        numbers_by_commit.main(["--bisect", commits[0], commits[5], "--repo", str(repo), "--work", str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].split(": error: ")[1] == (
        f"the runs of {commits[5][:12]} failed (iisan demo: exit status 1: the demo broke); their output: "
        f"{work / f'demo-{commits[5][:12]}.log'}")


def test_a_bisection_names_the_commits_whose_runs_failed_just_before_the_change(tmp_path, capsys):
    repo = fake_repo(tmp_path / "repo")
    commits = [commit(repo, "0.5", "first"), commit(repo, "-1", "broken"), commit(repo, "0.25", "mended, other "
                                                                                               "numbers"),
               commit(repo, None, "docs")]
    work = tmp_path / "work"
    assert numbers_by_commit.main(["--bisect", commits[0], commits[3], "--repo", str(repo), "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert out.split("first commit whose numbers differ")[1].splitlines()[1].startswith(commits[2][:7])
    assert out.rstrip().endswith(f"or one of the 1 commit(s) just before it, whose runs failed (their numbers are "
                                 f"unknown; logs in {work}): {commits[1][:12]}")


def test_live_methods_train_from_each_commits_demo_and_are_compared_too(history, tmp_path, capsys):
    repo, commits = history
    work = tmp_path / "work"
    assert numbers_by_commit.main([commits[0], "--repo", str(repo), "--work", str(work)]) == 0
    ran = (work / f"demo-{commits[0][:12]}.log").read_text()
    assert numbers_by_commit.main(["--live", "fft,lora", commits[0], commits[2], "--repo", str(repo),
                                   "--work", str(work)]) == 1
    out = capsys.readouterr().out
    assert "    fft: best epoch 0, valid HR@10 5.0000 test HR@10 2.5000\n" in out  # ten times the demo's
    assert "other numbers (demo, fft, lora): demo epoch 0 loss: 1.0 -> 0.5; demo valid hit@10: 0.5 -> 0.25" in out
    log_text = (work / f"demo-{commits[0][:12]}.log").read_text()
    assert log_text != ran and log_text.count("$ iisan train --config ") == 2  # the kept demo alone: run again
    kept = json.loads((work / f"numbers-{commits[0]}.json").read_text())
    assert list(kept["numbers"]) == ["demo", "fft", "lora"]
    assert numbers_by_commit.main([commits[0], commits[2], "--repo", str(repo), "--work", str(work)]) == 1
    assert "fft" not in capsys.readouterr().out.split("\n\n")[0]  # kept runs beyond those asked are not shown
    assert (work / f"demo-{commits[0][:12]}.log").read_text() == log_text  # and nothing ran


def test_runs_that_time_out_or_leave_two_folders_fail_in_one_line(history, tmp_path, capsys):
    repo, commits = history
    flags = ["--repo", str(repo), "--work", str(tmp_path / "w"), "--timeout", "2"]
    assert numbers_by_commit.main([commits[0], commits[6], commits[7], *flags]) == 1
    out = capsys.readouterr().out
    assert "failed: iisan demo: over --timeout 2 s: " in out and "failed: iisan demo: 2 run folders: " in out


def test_a_relative_work_folder_and_kept_runs_of_other_calls(history, tmp_path, monkeypatch, capsys):
    """A relative --work (each run's working folder is its commit's code); --live fft, then lora, then fft: the
    third call runs nothing; another environment (torch, CPU) runs again."""
    repo, commits = history
    monkeypatch.chdir(tmp_path)
    log_file = tmp_path / "w" / f"demo-{commits[0][:12]}.log"
    for live in ("fft", "lora", "fft"):
        assert numbers_by_commit.main(["--live", live, commits[0], "--repo", str(repo), "--work", "w"]) == 0
        if live == "lora":
            ran = log_file.read_text()
    assert log_file.read_text() == ran and "--method lora" in ran
    kept = json.loads((tmp_path / "w" / f"numbers-{commits[0]}.json").read_text())
    assert list(kept["numbers"]) == ["demo", "fft", "lora"]
    from iisan.experiments import commits as module
    monkeypatch.setattr(module, "environment", lambda: {**kept["environment"], "torch": "another"})
    assert numbers_by_commit.main(["--live", "fft", commits[0], "--repo", str(repo), "--work", "w"]) == 0
    assert log_file.read_text() != ran and "--method fft" in log_file.read_text()


def test_a_foreign_log_in_work_is_refused_before_any_run(history, tmp_path, capsys):
    repo, commits = history
    notes = tmp_path / f"demo-{commits[0][:12]}.log"
    notes.write_text("my notes\n")
    with pytest.raises(SystemExit):
        numbers_by_commit.main([commits[0], "--repo", str(repo), "--work", str(tmp_path)])
    assert f"--work {notes} exists and is not a log of numbers_by_commit.py" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n" and not list(tmp_path.glob("numbers-*"))


def test_a_bisection_from_a_side_branch_looks_only_at_commits_holding_it(tmp_path):
    """A - B - M - D, M merging S1 - S2 (branched at A): after S1 come M and D, not B, which never held S1."""
    from iisan.experiments.commits import first_parent_line

    repo = tmp_path / "repo"
    (repo / "iisan").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    a = commit(repo, "1", "A")
    git = ["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run([*git, "checkout", "-qb", "side"], check=True)
    s1, _ = commit(repo, "2", "S1"), commit(repo, "3", "S2")
    subprocess.run([*git, "checkout", "-q", "main"], check=True)
    b = commit(repo, None, "B")
    subprocess.run([*git, "merge", "-q", "--no-edit", "-X", "theirs", "side"], check=True, capture_output=True)
    m = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    d = commit(repo, None, "D")
    assert first_parent_line(repo, s1, d) == [m, d]
    assert first_parent_line(repo, a, d) == [b, m, d]


@pytest.mark.parametrize("argv, said", [
    (["--live", "fft,sasrec", "HEAD"], "argument --live: 'fft,sasrec': expected methods among "
                                       "iisan,fft,adapter,lora,bitfit, comma-separated"),
    (["nosuch", "HEAD"], "'nosuch' is not a commit of {repo}"),
    (["HEAD", "--repo", "{plain}"], "git rev-parse --git-dir in {plain}: fatal: not a git repository (or any of "
                                    "the parent directories): .git"),
    (["--bisect", "{c2}", "{c0}"], "{c2s} is not an ancestor of {c0s}: give the older commit first"),
])
def test_bad_commits_and_methods_are_one_line(history, tmp_path, capsys, argv, said):
    repo, commits = history
    names = {"repo": repo, "c0": commits[0], "c2": commits[2], "c0s": commits[0][:12], "c2s": commits[2][:12],
             "plain": tmp_path}
    with pytest.raises(SystemExit):
        numbers_by_commit.main(["--repo", str(repo), "--work", str(tmp_path / "w")] +
                               [a.format(**names) for a in argv])
    assert not (tmp_path / "w").exists()  # refused before anything was made
    err = capsys.readouterr().err.strip().splitlines()
    if argv[0] != "--live":  # (a flag argparse refuses comes after its usage lines, as for every command)
        assert len(err) == 1
    assert err[-1].split(": error: ")[1] == said.format(**names)


def test_an_out_file_it_did_not_write_is_refused_and_kept(history, tmp_path, capsys):
    repo, commits = history
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(SystemExit):
        numbers_by_commit.main([commits[0], "--repo", str(repo), "--work", str(tmp_path), "--out", str(mine)])
    assert "is not a result of numbers_by_commit.py" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}'
