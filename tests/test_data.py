"""The data protocol against hand-worked examples, bad input, and the real data statistics."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from iisan.cli.main import main
from iisan.data.interactions import load_dataset, read_items, read_users
from iisan.errors import DataError

from .conftest import shared_file


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def small(tmp_path):
    # items file order: a..h; f and g fall outside u2's last 6, h is never used: all three dropped
    items = write(tmp_path, "items.tsv", "".join(f"{x}\t Title {x.upper()} &amp; co\n" for x in "abcdefgh"))
    users = write(tmp_path, "users.tsv",
                  "u1\ta b c d e\n"
                  "u2\tg f e d c b a a\n"
                  "u3\ta b\n")  # too short: skipped
    return users, items


def test_protocol_reindexes_in_items_file_order_and_splits(small):
    users, items = small
    data = load_dataset(users, items, max_seq_len=3, min_seq_len=5)  # keeps the last 3 + 3 = 6
    assert data.item_ids == ["", "a", "b", "c", "d", "e"]  # items-file order kept
    assert data.titles[1] == " Title A &amp; co"  # raw title; lower-casing happens at tokenisation
    assert data.user_ids == ["u1", "u2"]
    assert data.skipped["users_too_short"] == 1
    # u2 keeps its last 6: e d c b a a -> 5 4 3 2 1 1, right-aligned in 6 columns
    assert data.padded.tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 1]]
    assert data.train_sequences().tolist() == [[0, 1, 2, 3], [5, 4, 3, 2]]
    inputs, targets, history = data.eval_split("valid")
    assert inputs.tolist() == [[1, 2, 3], [4, 3, 2]] and targets.tolist() == [4, 1]
    assert history.tolist() == [[0, 1, 2, 3], [5, 4, 3, 2]]
    inputs, targets, history = data.eval_split("test")
    assert inputs.tolist() == [[2, 3, 4], [3, 2, 1]] and targets.tolist() == [5, 1]
    assert history.tolist() == [[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]]
    assert data.stats() == {"users": 2, "items": 5, "interactions": 11}


def test_a_users_file_holds_each_item_ids_string_once(tmp_path):
    """A million users' 8M interactions of 100k items were 8M strings, most of what loading them took and kept
    of the memory: each id read is now the first string of it."""
    users = tmp_path / "users.tsv"
    users.write_text("u1\titem-a item-b item-a\nu2\titem-b item-a\nu1\titem-b\n")
    read = dict(read_users(users, merge_duplicates=True))
    assert read == {"u1": ["item-a", "item-b", "item-a", "item-b"], "u2": ["item-b", "item-a"]}
    strings = [item for items in read.values() for item in items]
    assert len({id(s) for s in strings}) == 2  # one object per distinct id, merged lines too


def test_popularity_counts_train_parts_only(small):
    users, items = small
    data = load_dataset(users, items, max_seq_len=3, min_seq_len=5)
    # train parts: [1 2 3] and [5 4 3 2] -> counts 1:1 2:2 3:2 4:1 5:1, total 7; index 0 is 1.0
    expected = np.array([1.0, 1, 2, 2, 1, 1]) / np.array([1.0] + [7] * 5)
    np.testing.assert_allclose(data.popularity(), expected)


def test_targets_that_repeat_the_history_are_counted_and_said_with_the_data(tmp_path, caplog, capsys):
    """u1's test target c repeats its history (no other target does): the evaluation masks it, so the
    run's data line says how many test targets can only be misses; most of them, a warning too."""
    from iisan.config import Config
    from iisan.data.run_data import describe_data

    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdef"))
    users = write(tmp_path, "users.tsv", "u1\ta b c d e c\nu2\tb c d a e f\nu3\ta b c d e f\n")
    data = load_dataset(users, items)
    assert (data.repeated_targets("test"), data.repeated_targets("valid")) == (1, 0)
    cfg = Config(users=str(users), items=str(items))
    assert describe_data(data, cfg) == ("data: 3 users, 6 items, 18 interactions; 1 test targets (33.3 %) repeat an "
                                        "item of their history and count as misses (iisan train "
                                        "--rank-repeated-targets ranks them)")
    assert describe_data(data, cfg.replace(rank_repeated_targets=True)) == "data: 3 users, 6 items, 18 interactions"
    assert not caplog.records
    main(["data-stats", "--users", str(users), "--items", str(items)])
    assert capsys.readouterr().out.splitlines()[-1] == ("targets that repeat an item of their history (misses under "
                                                        "the protocol): valid 0 (0.0 %), test 1 (33.3 %)")
    users.write_text("u1\ta b c d e c\nu2\ta b c d e e\nu3\ta b c d e f\n")
    line = describe_data(load_dataset(users, items), cfg)
    assert "2 test targets (66.7 %) repeat an item of their history" in caplog.records[-1].getMessage()
    assert line == "data: 3 users, 6 items, 18 interactions"  # (the warning says it: not twice in a row)
    items.write_text("".join(f"{x}\tt{x}\n" for x in "abcdefgh"))  # g and h: in no user's history
    line = describe_data(load_dataset(users, items), cfg)
    assert line == "data: 3 users, 6 items (2 more in items.tsv in no kept user's history), 18 interactions"
    caplog.set_level(logging.INFO, logger="iisan")
    caplog.clear()
    describe_data(load_dataset(users, items), cfg)  # a sweep's next point: a warning buried the grid's errors
    assert [r.levelno for r in caplog.records if "repeat an item" in r.getMessage()] == [logging.INFO]


def test_users_line_without_tab_names_file_and_line(tmp_path):
    users = write(tmp_path, "users.tsv", "u1\ta b c d e\nu2 a b c d e\n")
    with pytest.raises(DataError, match=r"users.tsv:2: expected user_id<TAB>item item \.\.\., found no tab"):
        read_users(users)


def test_unknown_item_ids_are_counted_and_logged(tmp_path, caplog):
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdef"))
    users = write(tmp_path, "users.tsv", "u1\ta b zz c d e\nu2\ta b c d e f\n")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(users, items)
    assert data.skipped["unknown_item_interactions"] == 1 and data.skipped["unknown_item_ids"] == 1
    assert data.padded[0, -5:].tolist() == [1, 2, 3, 4, 5]
    assert "skipped 1 interactions with 1 item ids not in" in caplog.text and "zz" in caplog.text


def test_data_warnings_true_of_every_run_of_a_sweep_warn_once_and_a_launchs_rank_0_alone_warns(tmp_path, caplog,
                                                                                            monkeypatch):
    """A 2x2 sweep printed each data warning four times (and each rank of a launch once more): the first is a
    warning, the rest INFO lines for their runs' train.log; another rank says at INFO what rank 0 warns of."""
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdef"))
    users = write(tmp_path, "users.tsv", "u1\ta b zz c d e\nu2\ta b c d e f\nu3\ta b\n")
    caplog.set_level(logging.INFO, logger="iisan")
    for _ in range(3):  # the points of a sweep, in one process
        load_dataset(users, items)
    said = [r.levelname for r in caplog.records if "skipped" in r.getMessage()]
    assert said == ["WARNING", "WARNING", "INFO", "INFO", "INFO", "INFO"]  # unknown ids, short users; twice more
    caplog.clear()
    load_dataset(write(tmp_path, "more.tsv", "u1\ta b zz yy c d e\n"), items)  # another data set: its own warning
    assert [r.levelname for r in caplog.records if "skipped" in r.getMessage()] == ["WARNING"]
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    load_dataset(users, write(tmp_path, "other.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdefg")))  # new to this one
    assert {r.levelname for r in caplog.records if "skipped" in r.getMessage()} == {"INFO"}


def test_an_unknown_id_with_an_invisible_character_is_shown_escaped(tmp_path, caplog):
    """``c\\x00`` is not the item ``c``: the warning shows it quoted, its NUL escaped."""
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdef"))
    users = write(tmp_path, "users.tsv", "u1\ta b c\x00 c d e f\nu2\ta b c d e f\n")
    with caplog.at_level(logging.WARNING):
        load_dataset(users, items)
    assert "with 1 item ids not in" in caplog.text and "(e.g. 'c\\x00')" in caplog.text


def test_a_header_line_as_pandas_writes_one_is_named_and_still_read_as_data(tmp_path, caplog):
    """The authors' files have no header: a first line naming its columns is read as a user and an item, as
    before, with a warning naming the file and line; an id that merely looks like a name later is not one."""
    items = write(tmp_path, "items.tsv", "ITEM_ID\ttitle\n" + "".join(f"{x}\tt{x}\n" for x in "abcdef") + "id\tt\n")
    users = write(tmp_path, "users.tsv", "\nuser_id\titem_ids\nu1\ta b c d e\nu2\ta b c d e f\n")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(users, items)
    headers = [r.getMessage() for r in caplog.records if "looks like a column name" in r.getMessage()]
    assert headers == [f"{items}:1: 'ITEM_ID' looks like a column name, but these files have no header line "
                       "(item_id<TAB>title on every line), so it is read as an id; delete the line if it is a header",
                       f"{users}:2: 'user_id' looks like a column name, but these files have no header line "
                       "(user_id<TAB>item item ... on every line), so it is read as an id; delete the line if it "
                       "is a header"]
    assert data.user_ids == ["u1", "u2"] and data.skipped["unknown_item_ids"] == 1  # item_ids: no such item
    assert read_items(items).ids[0] == "ITEM_ID"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_items(write(tmp_path, "plain.tsv", "a\tta\nitem\ttitle\n"))
    assert not caplog.records


def test_short_users_are_counted_and_logged(tmp_path, caplog):
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdef"))
    users = write(tmp_path, "users.tsv", "u1\ta b c d\nu2\ta b c d e f\n")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(users, items)
    assert data.user_ids == ["u2"] and data.skipped["users_too_short"] == 1
    assert "skipped 1 users with fewer than 5" in caplog.text


def test_a_minimum_length_that_leaves_no_training_item_is_refused_as_a_config_is(small):
    """load_dataset called directly takes the same bound as --min-seq-len: a test, a validation and at
    least one earlier item."""
    users, items = small
    with pytest.raises(DataError, match=r"^min_seq_len=2: leave-one-out needs at least 3 interactions per user$"):
        load_dataset(users, items, min_seq_len=2)
    assert load_dataset(users, items, min_seq_len=3).user_ids == ["u1", "u2"]


def test_duplicate_item_id_names_both_lines(tmp_path):
    items = write(tmp_path, "items.tsv", "a\tone\nb\ttwo\na\tthree\n")
    with pytest.raises(DataError, match=r"items.tsv:3: duplicate item id 'a' \(first on line 1\)"):
        read_items(items)


def test_empty_title_is_an_error_unless_allowed(tmp_path):
    items = write(tmp_path, "items.tsv", "a\tone\nb\t  \n")
    with pytest.raises(DataError, match=r"items.tsv:2: empty title for item 'b'"):
        read_items(items)
    assert read_items(items, allow_empty_titles=True).titles == ["one", "  "]


def test_items_line_without_tab(tmp_path):
    items = write(tmp_path, "items.tsv", "a\tone\nb two\n")
    with pytest.raises(DataError, match=r"items.tsv:2: expected item_id<TAB>title"):
        read_items(items)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match="users file .*nope.tsv does not exist"):
        read_users(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="items file .*nope.tsv does not exist"):
        read_items(tmp_path / "nope.tsv")


def test_a_missing_relative_path_names_the_working_folder(tmp_path, monkeypatch):
    """Relative paths (flags and config files alike) are taken from the working folder: the message says
    which, so a config file used from another folder shows why its paths are not found."""
    from iisan.data.cache import read_metadata
    from iisan.data.images import ImageStore
    from iisan.errors import CacheError, ImageStoreError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        read_users(Path("data") / "users.tsv")
    assert str(info.value) == f"users file data/users.tsv (in the working folder {tmp_path}) does not exist"
    with pytest.raises(ImageStoreError, match=rf"^image LMDB x.lmdb \(in the working folder {tmp_path}\) does not"):
        ImageStore("x.lmdb")
    with pytest.raises(CacheError, match=rf"^cache file c/text.safetensors \(in the working folder {tmp_path}\) "):
        read_metadata("c/text.safetensors")


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    items = write(tmp_path, "items.tsv", "a\tone\na\ttwo\n")
    users = write(tmp_path, "users.tsv", "u1\ta a a a a\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["data-stats", "--users", str(users), "--items", str(items)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "duplicate item id 'a'" in err


@pytest.mark.realdata
@pytest.mark.parametrize("folder,users,items,expected", [
    ("Scientific", "am_Industrial_and_Scientific_users.tsv", "Industrial_and_Scientific_items.tsv",
     ("12,076", "20,314", "81,711")),
    ("Instrument", "am_Musical_Instruments_users_10K.tsv", "Musical_Instruments_items.tsv",
     ("10,000", "19,246", "75,022")),
])
def test_data_stats_on_the_shared_data(folder, users, items, expected, capsys):
    main(["data-stats", "--users", str(shared_file(folder, users)), "--items", str(shared_file(folder, items))])
    out = capsys.readouterr().out
    assert f"users: {expected[0]}" in out and f"items: {expected[1]}" in out
    assert f"interactions: {expected[2]}" in out


def test_another_encoding_reads_the_same_data_and_a_byte_order_mark_is_dropped(small, tmp_path):
    users, items = small
    reference = load_dataset(users, items, max_seq_len=3, min_seq_len=5)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(items.read_text().replace("Title A", "Titlé A").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.tsv:1: byte 0xe9 at column 8 is not utf-8 text; pass --encoding"):
        read_items(latin)
    data = load_dataset(users, latin, max_seq_len=3, min_seq_len=5, encoding="latin-1")
    assert data.titles[1] == " Titlé A &amp; co" and data.item_ids == reference.item_ids
    assert np.array_equal(data.padded, reference.padded)
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + items.read_bytes())  # as some editors save UTF-8
    assert read_items(bom).ids == read_items(items).ids


def test_duplicate_users_are_an_error_or_merged_in_file_order(tmp_path):
    users = write(tmp_path, "users.tsv", "u1\ta b\nu2\tc d e f g\nu1\tc d e\n")
    with pytest.raises(DataError, match=r"users.tsv:3: user 'u1' already has a line \(1\); pass "
                                        "--merge-duplicate-users"):
        read_users(users)
    assert read_users(users, merge_duplicates=True) == [("u1", ["a", "b", "c", "d", "e"]),
                                                         ("u2", ["c", "d", "e", "f", "g"])]


@pytest.mark.parametrize("item_id,problem", [
    ("a b", "contains whitespace"), ("../x", "contains a path separator"), ("C:\\x", "contains a path separator"),
    ("..", "is reserved"), ("__meta__", "is reserved"), ("a\u200bb", "contains the control character U+200B"),
    ("x" * 201, "is longer than 200 bytes"),
])
def test_item_ids_that_cannot_name_an_image_file_are_refused(tmp_path, item_id, problem):
    items = write(tmp_path, "items.tsv", f"ok\tfine\n{item_id}\ttitle\n")
    with pytest.raises(DataError, match=rf"items.tsv:2: item id .* {re.escape(problem)}.*; item ids must be usable"):
        read_items(items)
    assert read_items(write(tmp_path, "good.tsv", "B00X-1_a.b\tfine\n")).ids == ["B00X-1_a.b"]


def test_item_ids_joined_by_commas_get_a_hint(tmp_path):
    items = write(tmp_path, "items.tsv", "".join(f"I{i}\ttitle {i}\n" for i in range(6)))
    users = write(tmp_path, "users.tsv", "u1\tI0,I1,I2,I3,I4,I5\nu2\tI5,I4,I3,I2,I1\n")
    with pytest.raises(DataError) as info:
        load_dataset(users, items)
    assert str(info.value) == (f"{users}: no user has 5 or more interactions with known items (item ids are "
                               "separated by spaces; the unknown ids here contain ',')")


def test_a_users_line_may_end_in_a_tab_but_holds_two_fields(tmp_path):
    """A trailing tab (or blank) is no third field; a third field (a timestamp column) is refused by line."""
    users = tmp_path / "users.tsv"
    users.write_text("U1\tI1 I2 I3\t\nU2\tI2 I3 \n")
    assert read_users(users) == [("U1", ["I1", "I2", "I3"]), ("U2", ["I2", "I3"])]
    users.write_text("U1\tI1 I2 I3\n\nU2\tI2 I3\t1712345678\n")
    with pytest.raises(DataError, match=r"users.tsv:3: 3 tab-separated fields, expected 2"):
        read_users(users)


def test_an_items_line_may_end_in_a_tab_as_a_users_line_may(tmp_path):
    """A trailing tab ends an empty field: the users file took it and the items file refused the same line
    as '3 tab-separated fields'. A third field that holds something is still refused by line."""
    items = tmp_path / "items.tsv"
    items.write_text("I1\tRed lamp\t\nI2\t blue chair \t\t\nI3\tgreen table\n")
    catalog = read_items(items)
    assert catalog.ids == ["I1", "I2", "I3"] and catalog.titles == ["Red lamp", " blue chair ", "green table"]
    items.write_text("I1\tRed lamp\nI2\tblue chair\tACME\t\n")
    with pytest.raises(DataError, match=r"items.tsv:2: 3 tab-separated fields, expected 2 \(item_id<TAB>title\)$"):
        read_items(items)
    items.write_text("I1\t\t\n")  # a title of nothing but the tab: empty
    with pytest.raises(DataError, match=r"items.tsv:1: empty title for item 'I1'"):
        read_items(items)


def test_files_of_two_data_sets_are_said_to_share_no_item(tmp_path):
    """An items file with only a header line (or another data set's items): no item id of the users file is
    in it, and the error says that, beside its size and first id, instead of only 'no user has 5'."""
    users, items = tmp_path / "users.tsv", tmp_path / "items.tsv"
    users.write_text("".join(f"U{u}\t" + " ".join(f"I{u + k}" for k in range(6)) + "\n" for u in range(4)))
    items.write_text("item_id\ttitle\n")
    with pytest.raises(DataError, match=r"users.tsv: no user has 5 or more interactions with known items: none of "
                                        r"its 9 item ids is among the 1 of .*items.tsv \(its first item_id\): are "
                                        r"the two files of one data set, without a header line\?$"):
        load_dataset(users, items)


def test_a_users_file_whose_lines_list_no_items_says_so(tmp_path):
    """Lines of a user id and a tab alone were said to hold '0 item ids' none of which is an item, and asked
    whether the files were of one data set."""
    users, items = tmp_path / "users.tsv", tmp_path / "items.tsv"
    users.write_text("U1\t\nU2\t \n")
    items.write_text("I1\tone\n")
    with pytest.raises(DataError) as info:
        load_dataset(users, items)
    assert str(info.value) == (f"{users}: no user has 5 or more interactions with known items: its lines list no "
                               "item ids (expected user_id<TAB>item item ..., oldest first)")


def test_a_users_earlier_items_are_the_kept_ones_in_order(tmp_path):
    """max_seq_len 2 keeps each user's last 5: u1's 'a' and 'x' come before them, 'x' in no user's last 5
    (dropped from the data set), 'a' in u2's. u1's full history (what recommending for u1 masks) is its kept
    items in order, never the padding index 0 where 'x' was."""
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt{x}\n" for x in "abcdefgx"))
    users = write(tmp_path, "users.tsv", "u1\tx a x b c d e f\nu2\tg a b c d\n")
    data = load_dataset(users, items, max_seq_len=2)
    index = {item_id: i for i, item_id in enumerate(data.item_ids)}
    assert "x" not in index and data.earlier[0].tolist() == [index["a"]] and 1 not in data.earlier
    assert data.history(0).tolist() == [index[i] for i in "abcdef"] and (data.history(1) > 0).all()


def test_the_data_line_groups_thousands_as_the_progress_lines_do():
    from types import SimpleNamespace

    from iisan.config import Config
    from iisan.data.run_data import describe_data

    data = SimpleNamespace(catalog=range(200_005), num_items=200_000, num_users=300_000, num_interactions=2_917_831,
                           repeated_targets=lambda split: 12_345)
    assert describe_data(data, Config(items="d/items.tsv")) == (
        "data: 300,000 users, 200,000 items (5 more in items.tsv in no kept user's history), 2,917,831 interactions; "
        "12,345 test targets (4.1 %) repeat an item of their history and count as misses (iisan train "
        "--rank-repeated-targets ranks them)")


def test_ids_in_another_unicode_normal_form_are_named_as_such(tmp_path, caplog):
    """A users file in NFD (e + combining accent) beside items in NFC: the warning's example read 'é', to the
    eye the very id the items file holds."""
    import logging
    import unicodedata

    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    items = write(tmp_path, "items.tsv", "".join(f"{x}\tt {x}\n" for x in (nfc, "a", "b", "c", "d", "e")))
    users = write(tmp_path, "users.tsv", f"u1\ta b c d e {nfd}\nu2\ta b c d e\n")
    with caplog.at_level(logging.WARNING, logger="iisan.data.interactions"):
        load_dataset(users, items)
    assert caplog.messages == [
        f"{users}: skipped 1 interactions with 1 item ids not in {items} (e.g. {nfd}; 1 of them are ids of items.tsv "
        f"written with other Unicode characters, e.g. {nfd!r} (U+0063 U+0061 U+0066 U+0065 U+0301) here, {nfc!r} "
        "(U+0063 U+0061 U+0066 U+00E9) there: write both files in one normal form (NFC))"]


def test_large_files_say_their_reading_before_and_after(small, monkeypatch, caplog):
    """A million users' files took a minute and more to read, without a line: files past ``SAID_BYTES`` say
    what is being read and, once the protocol has run, what was read and kept, in how long."""
    from iisan.data import interactions

    users, items = small
    with caplog.at_level("INFO", logger="iisan.data.interactions"):
        load_dataset(users, items, max_seq_len=3)
    assert not [r for r in caplog.records if r.getMessage().startswith("read")]  # small files: nothing said
    monkeypatch.setattr(interactions, "SAID_BYTES", users.stat().st_size + items.stat().st_size)
    with caplog.at_level("INFO", logger="iisan.data.interactions"):
        load_dataset(users, items, max_seq_len=3)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read")]
    assert said[0] == f"reading {users} and {items} ({users.stat().st_size + items.stat().st_size} bytes)"
    assert re.fullmatch(r"read 3 users and 8 items, and kept 2 users and 5 items \(the protocol\), in \d+ s", said[1])


def test_the_protocol_on_many_users_matches_one_worked_user_at_a_time(tmp_path):
    """The protocol runs on all users at once (numpy over one flat array): each user's row of ``padded`` and the
    items held aside before its last ``max_seq_len + 3`` are those of the user's line read alone."""
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(30)]
    items = write(tmp_path, "items.tsv", "".join(f"{i}\tt {i}\n" for i in ids))
    lines = [(f"u{u}", [ids[k] for k in rng.integers(0, 30, rng.integers(3, 14))]) for u in range(60)]
    users = write(tmp_path, "users.tsv", "".join(f"{u}\t{' '.join(seq)} zz{u}\n" for u, seq in lines))
    data = load_dataset(users, items, max_seq_len=4, min_seq_len=5)
    keep, kept = 4 + 3, [(u, seq) for u, seq in lines if len(seq) >= 5]  # zz<u>: an unknown id on every line
    assert data.user_ids == [u for u, _ in kept] and data.skipped["unknown_item_interactions"] == 60
    index = {item: n for n, item in enumerate(data.item_ids)}
    for row, (user, seq) in enumerate(kept):
        tail = [index[item] for item in seq[-keep:]]
        assert data.padded[row].tolist() == [0] * (keep - len(tail)) + tail, user
        before = [index[item] for item in seq[:-keep] if item in index]
        assert data.earlier.get(row, np.array([], dtype=np.int64)).tolist() == before, user


@pytest.mark.parametrize("item_id", ["a\u00a0b", "a\u2003b", "a\x0bb"])
def test_an_item_id_holding_any_whitespace_is_refused(item_id, tmp_path):
    """A no-break space or an em space is whitespace too: the id could not be one of a users line's ids."""
    items = write(tmp_path, "items.csv", f"item,title\n{item_id},a title\n")
    with pytest.raises(DataError, match=r"items.csv:2: item id .* contains whitespace"):
        read_items(items)
