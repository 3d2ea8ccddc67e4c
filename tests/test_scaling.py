"""scripts/benchmark_scale.py end to end on tiny inputs: every stage runs in its own process and did the work
it was timed for; the rates, the table and the files follow from the measured rows."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image

from iisan.experiments.scaling import STAGES, table, with_rates

from ._scripts import ROOT, load_script, script_error


def test_every_stage_runs_in_its_own_process_and_does_the_work_it_is_timed_for(tmp_path, capsys):
    out = tmp_path / "scale.json"
    load_script("benchmark_scale.py").main(["--scale", "0.004", "--sizes", "1", "--out", str(out), "--no-progress"])
    payload = json.loads(out.read_text())  # strict JSON
    counts = {stage: max(1, round(base * 0.004)) for stage, (_, base, _) in STAGES.items()}
    assert [(r["stage"], r["count"]) for r in payload["rows"]] == list(counts.items())
    found = {r["stage"]: r["found"] for r in payload["rows"]}
    assert found["csv"] == counts["csv"]  # every interaction read back
    assert found["evaluation"]["users_ranked"] == counts["evaluation"]
    assert found["cache-check"] == [counts["cache-check"] // 2]  # the one row given a NaN, and no other
    assert found["grid"] == 100  # 10 learning rates x 10 seeds
    titles = counts["title-table"]  # and the padding item's empty title, row 0: its [CLS] and [SEP]
    assert found["title-table"]["shape"] == [titles + 1, 30]
    assert found["title-table"]["dtypes"] == ["torch.int32", "torch.bool"]  # the compact table (f5a3578)
    assert found["title-table"]["bytes"] == (titles + 1) * 30 * 5
    assert 2 + 5 * titles <= found["title-table"]["tokens"] <= 2 + 14 * titles  # 3 to 12 words, [CLS] and [SEP]
    assert found["item-table"] == {"shape": [counts["item-table"] + 1, 64], "dtype": "torch.float32", "in_order": True}
    for r in payload["rows"]:
        assert r["seconds"] > 0 and r["peak_rise_bytes"] >= 0
        assert r["microseconds_per_unit"] == pytest.approx(1e6 * r["seconds"] / r["count"])
    assert payload["git_commit"] and payload["versions"]["torch"] and payload["sizes"] == [1]
    assert out.with_suffix(".md").read_text() == table(payload["rows"]) + "\n"
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert str(out) in capsys.readouterr().out


def test_the_table_gives_each_rows_rates_per_unit():
    rows = [with_rates({"stage": "csv", "count": 50_000, "seconds": 0.25, "peak_rise_bytes": 10 * 2**20}),
            with_rates({"stage": "grid", "count": 500, "seconds": 1.5, "peak_rise_bytes": 0})]
    assert table(rows).splitlines()[2:] == ["| csv | interactions | 50,000 | 0.25 | 5.0 | 10 | 210 |",
                                            "| grid | run folders | 500 | 1.50 | 3000.0 | 0 | 0 |"]


@pytest.mark.parametrize("scale", ["nan", "0", "1e9", "ten"])
def test_a_scale_that_is_no_number_in_range_is_one_line(scale, capsys):
    err = script_error("benchmark_scale", ["--scale", scale], capsys)
    assert f"argument --scale: {scale!r} is not a number from 0.0001 to 100" in err and "Traceback" not in err


def test_only_its_own_files_are_replaced_and_anything_else_is_refused_before_any_work(tmp_path, capsys):
    from iisan.experiments.scaling import is_own

    flags = ["--scale", "0.001", "--sizes", "1", "--stages", "csv", "--no-progress", "--out"]
    out = tmp_path / "scale.json"
    load_script("benchmark_scale.py").main([*flags, str(out)])
    assert all(is_own(out.with_suffix(s)) for s in (".json", ".md", ".png"))
    load_script("benchmark_scale.py").main([*flags, str(out)])  # its own: replaced
    theirs = tmp_path / "theirs.json"  # (the .json's name gives the other two)
    picture = io.BytesIO()
    Image.new("RGB", (2, 2)).save(picture, format="PNG")  # a real PNG, of no Creator of ours
    for suffix, data in ((".json", b'{"rows": []}'), (".md", b"# my notes\n"), (".png", picture.getvalue())):
        other = theirs.with_suffix(suffix)
        other.write_bytes(data)
        err = script_error("benchmark_scale", [*flags, str(theirs)], capsys)
        assert f"--out {other} exists and is not a result of benchmark_scale.py" in err and "Traceback" not in err
        assert other.read_bytes() == data and [p.name for p in tmp_path.glob("theirs*")] == [other.name]
        other.unlink()


def test_a_measuring_process_that_fails_is_one_line_naming_the_stage_and_its_error(tmp_path):
    from iisan.errors import UserError
    from iisan.experiments.scaling import run_one

    with pytest.raises(UserError, match=r"^no-such-stage of 3 failed: KeyError: 'no-such-stage'$"):
        run_one("no-such-stage", 3, tmp_path / "scratch")


def _rows(sizes, order=tuple(STAGES)) -> list[dict]:
    """Rows of every stage at ``sizes``, over several decades of time and memory, one peak rise of zero."""
    rate = {"csv": 2e-6, "evaluation": 2e-4, "cache-check": 3e-5, "grid": 6e-4, "title-table": 1e-4,
            "item-table": 1e-5}
    return [{"stage": stage, "count": STAGES[stage][1] * s, "seconds": rate[stage] * STAGES[stage][1] * s ** 1.1,
             "peak_rise_bytes": 0 if (stage, s) == ("grid", 1) else int(rate[stage] * 2**33 * s)}
            for stage in order for s in sizes]


@pytest.mark.parametrize("sizes", [(1, 2, 4, 8), tuple(range(1, 25))])
def test_the_scale_figure_keeps_each_stage_in_its_style_and_no_label_meets_another(sizes):
    """Every minor tick was labelled ("100 90 80 70 60" on top of each other), 24 sizes ran together on the x axis,
    and a stage's colour was its place in the rows: grid green in one committed figure, red in the other."""
    from iisan.experiments.scaling import FLOOR_MIB, drawn

    from ._figures import clashes

    def styles(fig) -> dict:
        return {line.get_label(): (line.get_color(), line.get_marker(), line.get_linestyle())
                for line in fig.axes[0].lines}

    fig = drawn(_rows(sizes), "t")
    assert clashes(fig) == []
    assert len(set(styles(fig).values())) == len(STAGES)  # none alike,
    assert len({marker for _, marker, _ in styles(fig).values()}) == len(STAGES)  # nor told apart by colour alone
    assert len({linestyle for _, _, linestyle in styles(fig).values()}) == 4  # (matplotlib's four named styles)
    low, high = fig.axes[1].dataLim.intervaly  # memory: 0.01 to some MiB
    labelled = [float(t.get_text()) for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert math.log10(high / low) > 2.5 and labelled
    assert all(v == 10 ** round(math.log10(v)) for v in labelled)  # over 2.5 decades, the decades alone
    assert styles(drawn(_rows(sizes, order=tuple(reversed(STAGES))), "t")) == styles(fig)
    hollow = [line for line in fig.axes[1].lines if line.get_markerfacecolor() == "white"]
    assert [line.get_xydata().tolist() for line in hollow] == [[[1.0, FLOOR_MIB]]]  # grid's zero, at the floor


def test_the_committed_scale_figures_data_draws_without_a_clash():
    from iisan.experiments.scaling import drawn

    from ._figures import clashes

    for name in ("scale-cpu", "scale-cpu-before", "scale-cpu-tables", "scale-cpu-tables-before"):
        rows = json.loads((ROOT / "results" / f"{name}.json").read_text())["rows"]
        assert clashes(drawn(rows, name)) == [], name
