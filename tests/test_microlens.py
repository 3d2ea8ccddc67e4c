"""The MicroLens format: numeric ids, ``user,item,timestamp`` pairs or ``user<TAB>items`` sequences, an
``item,title`` CSV with quoted and empty titles; both forms give the same SeqRecData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iisan.data.csv_files import read_pairs_csv
from iisan.data.interactions import file_format, load_dataset
from iisan.errors import DataError

# user 7: items 10, 11, 12, 13, 14 in time order (file order shuffled, one tie kept in file order)
PAIRS_CSV = """user,item,timestamp
7,12,300
8,20,5
7,10,100
8,21,6
7,11,200
8,10,7
7,14,500
8,22,8
7,13,400
8,23,8
9,10,1
"""
PAIRS_TSV = "7\t10 11 12 13 14\n8\t20 21 10 22 23\n9\t10\n"
TITLES_CSV = '''item,title
10,"Cats, dogs and a ""quoted"" word"
11,
12,Mountain bike tricks
13,Cooking pasta
14,Guitar solo
20,Dance
21,Rain sounds
22,Chess opening
23,Street food
30,Never watched
'''
TITLES = [("10", 'Cats, dogs and a "quoted" word'), ("11", ""), ("12", "Mountain bike tricks"),
          ("13", "Cooking pasta"), ("14", "Guitar solo"), ("20", "Dance"), ("21", "Rain sounds"),
          ("22", "Chess opening"), ("23", "Street food"), ("30", "Never watched")]
TITLES_TSV = "".join(f"{i}\t{t}\n" for i, t in TITLES)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_and_tsv_forms_give_the_same_data(tmp_path):
    csv_data = load_dataset(_write(tmp_path, "MicroLens_pairs.csv", PAIRS_CSV),
                            _write(tmp_path, "MicroLens_title_en.csv", TITLES_CSV), allow_empty_titles=True)
    tsv_data = load_dataset(_write(tmp_path, "MicroLens_pairs.tsv", PAIRS_TSV),
                            _write(tmp_path, "MicroLens_title_en.tsv", TITLES_TSV), allow_empty_titles=True)
    # user 9 has one interaction (< 5) and item 30 occurs nowhere: both dropped by the protocol
    assert csv_data.user_ids == tsv_data.user_ids == ["7", "8"]
    assert csv_data.item_ids == tsv_data.item_ids == [""] + [i for i, _ in TITLES[:-1]]
    assert csv_data.titles[1] == 'Cats, dogs and a "quoted" word' and csv_data.titles[2] == ""
    assert csv_data.titles == tsv_data.titles
    expected = np.zeros((2, 13), dtype=np.int64)
    expected[0, 8:] = [1, 2, 3, 4, 5]  # 10, 11, 12, 13, 14 by timestamp
    expected[1, 8:] = [6, 7, 1, 8, 9]  # 20, 21, 10, 22, 23; the tie at t=8 keeps file order
    assert np.array_equal(csv_data.padded, expected) and np.array_equal(tsv_data.padded, expected)


def test_the_suffix_names_the_format_in_any_case(tmp_path):
    """``.csv``, ``.CSV``: the CSV readers; any other name (``.tsv``, ``.txt``, none): tab-separated."""
    assert [file_format(Path(n)) for n in ("a.csv", "a.CSV", "a.tsv", "a.txt", "a")] == ["csv", "csv"] + ["tsv"] * 3
    upper = load_dataset(_write(tmp_path, "P.CSV", PAIRS_CSV), _write(tmp_path, "T.Csv", TITLES_CSV),
                         allow_empty_titles=True)
    assert upper.user_ids == ["7", "8"] and upper.titles[1] == 'Cats, dogs and a "quoted" word'


def test_empty_titles_need_the_flag_and_bad_rows_are_one_line(tmp_path):
    titles = _write(tmp_path, "t.csv", TITLES_CSV)
    pairs = _write(tmp_path, "p.csv", PAIRS_CSV)
    with pytest.raises(DataError, match=r"t.csv:3: empty title for item '11' \(pass --allow-empty-titles"):
        load_dataset(pairs, titles)
    bad = _write(tmp_path, "bad.csv", "user,item\n7,10\n")
    with pytest.raises(DataError, match=r"bad.csv:1: no timestamp column in the header \['user', 'item'\]"):
        load_dataset(bad, titles, allow_empty_titles=True)
    bad = _write(tmp_path, "bad2.csv", "user,item,timestamp\n7,10,soon\n")
    with pytest.raises(DataError, match=r"bad2.csv:2: timestamp 'soon' is not a number"):
        load_dataset(bad, titles, allow_empty_titles=True)
    bad = _write(tmp_path, "bad4.csv", "user,item,timestamp\n7,10,1\n7,11,2,3\n")
    with pytest.raises(DataError, match=r"bad4.csv:3: 4 fields, the header has 3 \(a field holding a comma must "
                                        r"be quoted\)$"):
        load_dataset(bad, titles, allow_empty_titles=True)
    for stamp in ("nan", "inf", "-Infinity"):  # float() takes them; a NaN would sort an item anywhere
        bad = _write(tmp_path, "bad3.csv", f"user,item,timestamp\n7,10,1\n7,11,{stamp}\n")
        with pytest.raises(DataError, match=rf"bad3.csv:3: timestamp '{stamp}' is not a finite number$"):
            load_dataset(bad, titles, allow_empty_titles=True)


def test_timestamps_are_ordered_exactly_however_large_or_written(tmp_path):
    """Nanosecond stamps (past 2**53, where floats tie and file order would win), mixed with a decimal, an
    exponent and a sign, sort by their exact values; '1_0' and other scripts' digits are no numbers."""
    base = 10**18
    rows = [(base + 5, "a"), (base + 3, "b"), (base + 1, "c"), (base + 4, "d"), (base + 2, "e")]
    pairs = _write(tmp_path, "ns.csv", "user,item,timestamp\n" + "".join(f"7,{i},{t}\n" for t, i in rows)
                   + f"8,x,{base}.5\n8,y,1e18\n8,z,-2\n8,w, 1000000000000000000.25 \n")
    assert read_pairs_csv(pairs) == [("7", ["c", "e", "b", "d", "a"]), ("8", ["z", "y", "w", "x"])]
    bad = _write(tmp_path, "ctl.csv", "user,item,timestamp\n7\x01,10,1\n")
    with pytest.raises(DataError, match=r"ctl.csv:2: user id '7\\x01' contains the control character U\+0001$"):
        read_pairs_csv(bad)
    for stamp in ("1_0", "\u0661\u0662"):
        bad = _write(tmp_path, "odd.csv", f"user,item,timestamp\n7,10,{stamp}\n")
        with pytest.raises(DataError, match=rf"odd.csv:2: timestamp '{stamp}' is not a number$"):
            read_pairs_csv(bad)


def test_a_row_repeating_another_is_one_more_interaction_counted_in_a_warning(tmp_path, caplog):
    """An exported row written twice moves the user's later items (here the test target) one place: kept, as
    the sequences file would hold it, and said once, naming the first repeat; the same item at another time
    is a repeat purchase and no warning."""
    pairs = _write(tmp_path, "dup.csv", "user,item,timestamp\n7,a,1\n7,b,2\n7,a,3\n8,x,1\n7,b,2\n8,x,1\n")
    with caplog.at_level("WARNING", logger="iisan.data.csv_files"):
        assert read_pairs_csv(pairs) == [("7", ["a", "b", "b", "a"]), ("8", ["x", "x"])]
    assert [r.getMessage() for r in caplog.records] == [
        f"{pairs}: 2 rows repeat an earlier row's user, item and timestamp (e.g. line 6 repeats line 3); each is "
        "read as one more interaction: remove them from the file if they are duplicates"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="iisan.data.csv_files"):
        read_pairs_csv(_write(tmp_path, "again.csv", "user,item,timestamp\n7,a,1\n7,a,2\n"))
    assert not caplog.records


def test_users_whose_targets_a_tie_of_timestamps_decides_are_counted_in_a_warning(tmp_path, caplog):
    """Amazon's review times are whole days: a shuffled export of the same rows gave other valid and test targets
    to one user in nine, without a word. A tie before the last two items, or of one item with itself, decides
    nothing and is not counted."""
    rows = ("user,item,timestamp\n7,a,1\n7,b,1\n7,c,2\n7,d,3\n"  # 7: a and b tie, before the last two: no
            "8,x,5\n8,y,6\n8,z,6\n"                    # 8: its last two tie: the test target is z or y by order
            "9,p,1\n9,q,2\n9,q,2\n"                    # 9: a repeated row ties with itself: no
            "6,k,3\n6,m,3\n"                            # 6: two items, both at 3: valid and test by order
            "5,a,1\n5,b,2\n5,c,2\n5,d,3\n")               # 5: only the valid target (b or c) is tied
    with caplog.at_level("WARNING", logger="iisan.data.csv_files"):
        assert read_pairs_csv(pairs := _write(tmp_path, "ties.csv", rows))[:2] == [("7", ["a", "b", "c", "d"]),
                                                                                  ("8", ["x", "y", "z"])]
    tied = [r.getMessage() for r in caplog.records if "decided by the order" in r.getMessage()]
    assert tied == [f"{pairs}: 3 of 5 users' valid or test target is decided by the order of their rows in the file, "
                    "as their last two interactions share a timestamp with another item (e.g. user '8', lines 6, 7, "
                    "8); another order of the same rows gives other targets"]


def test_a_pairs_file_is_read_row_by_row_naming_its_first_problem_in_file_order(tmp_path):
    """Every row was held in a list before any was read (the list alone about 480 bytes an interaction), and a
    field count over all of them was checked first. An item id on many rows is one string (one copy a row
    before)."""
    rows = "user,item,timestamp\n7,a,1\n8,a,2\n7,b,x\n" + "9,c,3\n" * 1000 + "9,d,4,extra\n"
    with pytest.raises(DataError, match=r"bad.csv:4: timestamp 'x' is not a number$"):
        read_pairs_csv(_write(tmp_path, "bad.csv", rows))
    with pytest.raises(DataError, match=r"bad.csv:1005: 4 fields, the header has 3"):
        read_pairs_csv(_write(tmp_path, "bad.csv", rows.replace(",x", ",5")))
    pairs = _write(tmp_path, "ok.csv", "user,item,timestamp\n7,B000029795,1\n8,B000029795,2\n \t, ,\n7,B0000297,2\n")
    (_, seven), (_, eight) = read_pairs_csv(pairs)  # (a row of blanks is a blank row, skipped)
    assert seven == ["B000029795", "B0000297"] and seven[0] is eight[0]
    long = _write(tmp_path, "long.csv", f"user,item,timestamp\n7,a,{'1' * 5000}\n7,b,1\n7,c,{'1' * 4999}.5\n")
    assert read_pairs_csv(long) == [("7", ["b", "c", "a"])]  # whole numbers past int()'s 4300 digits, exact


def test_amazons_and_movielens_column_names_are_taken(tmp_path):
    """Amazon Reviews' reviewerID, asin (2023: parent_asin) and unixReviewTime, and MovieLens' userId and movieId,
    name the columns of exports researchers have; they were refused."""
    amazon = _write(tmp_path, "amazon.csv", "reviewerID,asin,overall,unixReviewTime\nA1,B2,5,100\nA1,B3,4,200\n")
    assert read_pairs_csv(amazon) == [("A1", ["B2", "B3"])]
    v2023 = _write(tmp_path, "2023.csv", "user_id,asin,parent_asin,timestamp\nA1,B2,P2,100\nA1,B3,P3,200\n")
    assert read_pairs_csv(v2023) == [("A1", ["P2", "P3"])]  # the 2023 release's item: its parent_asin
    movielens = _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,9\n1,29,3,8\n")
    assert read_pairs_csv(movielens) == [("1", ["29", "31"])]


def test_errors_name_the_line_a_row_starts_on_after_a_title_that_spans_lines(tmp_path):
    """A quoted title may hold a newline; the rows after it are still named by their own line."""
    titles = _write(tmp_path, "t.csv", 'item,title\n10,"two\nlines"\n\n11,\n')  # item 11 starts on line 5
    pairs = _write(tmp_path, "p.csv", PAIRS_CSV)
    with pytest.raises(DataError, match=r"t.csv:5: empty title for item '11'"):
        load_dataset(pairs, titles)
    bad = _write(tmp_path, "p2.csv", 'user,item,timestamp\n7,"1\n0",1\n7,11,soon\n')
    with pytest.raises(DataError, match=r"p2.csv:4: timestamp 'soon' is not a number"):
        load_dataset(bad, titles, allow_empty_titles=True)


@pytest.mark.parametrize("pairs,message", [
    ("", r"pairs file .*p.csv is empty"),
    ("user,item,timestamp\n7,10\n", r".*/p.csv:2: expected 3 columns, found 2"),
    ("user,item,timestamp\n7, ,3\n", r".*/p.csv:2: empty user or item id"),
    ("user,item,timestamp\n\n", r"pairs file .*p.csv holds no interactions"),
])
def test_every_bad_pairs_file_is_one_line_naming_it(tmp_path, pairs, message):
    titles = _write(tmp_path, "t.csv", TITLES_CSV)
    with pytest.raises(DataError, match=f"^{message}$"):
        load_dataset(_write(tmp_path, "p.csv", pairs), titles, allow_empty_titles=True)


def test_a_titles_row_without_the_item_column_is_one_line(tmp_path):
    titles = _write(tmp_path, "t.csv", "title,item\nlamp\n")
    with pytest.raises(DataError, match=r"^.*/t.csv:2: expected item,title, found \[.lamp.\]$"):
        load_dataset(_write(tmp_path, "p.csv", PAIRS_CSV), titles)


def test_a_titles_row_of_more_fields_than_the_header_is_refused_and_a_quoted_tab_is_text(tmp_path):
    """An unquoted comma would cut a title short (the rest a field no column reads); a tab inside a quoted
    CSV title is part of the title (only a TSV line's tab is a column)."""
    pairs = _write(tmp_path, "p.csv", PAIRS_CSV)
    titles = _write(tmp_path, "t.csv", TITLES_CSV.replace('"Cats, dogs and a ""quoted"" word"', "Cats, dogs"))
    with pytest.raises(DataError, match=r"t.csv:2: 3 fields, the header has 2 \(a field holding a comma must be "
                                        r"quoted\)$"):
        load_dataset(pairs, titles, allow_empty_titles=True)
    titles = _write(tmp_path, "t.csv", TITLES_CSV.replace("Mountain bike tricks", '"Mountain\tbike tricks"'))
    data = load_dataset(pairs, titles, allow_empty_titles=True)
    assert "Mountain\tbike tricks" in data.titles


def test_a_csv_field_over_the_reader_s_limit_is_one_line_naming_the_row(tmp_path):
    from iisan.data.csv_files import read_titles_csv
    from iisan.errors import DataError

    path = tmp_path / "titles.csv"
    path.write_text("item,title\nI1,short\nI2,\"" + "a" * 200_000 + "\"\n")
    with pytest.raises(DataError, match=r"titles\.csv:3: not a CSV row this reader takes \(field larger than field "
                                        r"limit \(131072\)\)"):
        read_titles_csv(path)
