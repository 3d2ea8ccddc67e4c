"""What a data file's bytes say before its text: a UTF-8 byte-order mark under another ``--encoding``, a
gzip-compressed or UTF-16 file, carriage returns inside a line (each on its own line and column, a CR-only
file refused, CRLF read), CSV line numbers counted at LF only; and two messages that lead somewhere: a
space-separated ``--history``, a long network error cut at a word."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from iisan.cli.main import main
from iisan.data.fetch import shortened
from iisan.data.interactions import read_items, read_users
from iisan.data.textfile import decoded_lines
from iisan.errors import DataError
from iisan.experiments.trained import TrainedRun

BOM = b"\xef\xbb\xbf"


def at(path: Path) -> str:
    """``path`` as a pattern that matches it literally."""
    return re.escape(str(path))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_a_utf8_byte_order_mark_under_another_encoding_is_refused_on_line_1(tmp_path, encoding):
    items = write(tmp_path, "items.tsv", BOM + b"B01EE3V1BU\tA\nB2\tB\n")
    users = write(tmp_path, "users.tsv", BOM + b"U1\tB01EE3V1BU B2\n")
    said = (rf"^{at(tmp_path)}/{{}}:1: starts with a UTF-8 byte-order mark \(ef bb bf\), but --encoding {encoding} "
            r"was given: the file is UTF-8; leave --encoding out")
    with pytest.raises(DataError, match=said.format("items.tsv")):
        read_items(items, encoding=encoding)
    with pytest.raises(DataError, match=said.format("users.tsv")):
        read_users(users, encoding=encoding)
    # under UTF-8 the mark is dropped, as before
    assert read_items(items).ids == ["B01EE3V1BU", "B2"]
    assert read_users(users, encoding="UTF8") == [("U1", ["B01EE3V1BU", "B2"])]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_gzip_file_says_gunzip(tmp_path, encoding):
    path = write(tmp_path, "items.tsv", gzip.compress(b"a\tb\n"))
    with pytest.raises(DataError, match=rf"^{at(path)}:1: starts with the bytes 1f 8b: the file is "
                                        r"gzip-compressed, not text; gunzip it first$"):
        read_items(path, encoding=encoding)


@pytest.mark.parametrize("bom, encoding, said", [
    (b"\xff\xfe", "utf-8", r"UTF-16 byte-order mark \(ff fe\): the file is UTF-16 text, not utf-8; pass --encoding "
                           r"utf-16 if the other data file is UTF-16 too, else save it as UTF-8 \(e.g. with iconv -f "
                           r"utf-16 -t utf-8\)$"),  # (--encoding reads both files: the other may be UTF-8)
    (b"\xfe\xff", "latin-1", r"UTF-16 byte-order mark \(fe ff\): .* not latin-1; pass --encoding utf-16 if .*$"),
    (b"\xff\xfe\x00\x00", "cp1252", r"UTF-32 byte-order mark \(ff fe 00 00\): .*; pass --encoding utf-32 if the "
                                   r"other data file is UTF-32 too, else save it as UTF-8 .*$"),
    (b"\xff\xfe", None, r"UTF-16 byte-order mark .*; save it as UTF-8 \(e.g. with iconv -f utf-16 -t utf-8\)$"),
    (b"\xff\xfe\x00\x00", "utf-16", r"UTF-32 byte-order mark \(ff fe 00 00\): .* not utf-16; pass --encoding utf-32 "
                                   r"if .*$"),
], ids=["utf16le-utf8", "utf16be-latin1", "utf32le-cp1252", "utf16le-no-flag", "utf32le-utf16"])
def test_a_utf16_file_says_pass_encoding_utf16(tmp_path, bom, encoding, said):
    path = write(tmp_path, "users.txt", bom + "u1\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=rf"^{at(path)}:1: starts with a {said}"):
        list(decoded_lines(path, encoding))


@pytest.mark.parametrize("encoding, codec", [("utf-16", "utf-16"), ("utf-16", "utf-16-be"),
                                             ("utf-16-le", "utf-16-le"), ("utf-32", "utf-32")])
def test_encoding_utf16_reads_a_utf16_file_with_crlf_as_it_is(tmp_path, encoding, codec):
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(codec, b"")  # utf-16/-32 write their own
    items = write(tmp_path, "items.tsv", bom + "B01\tÉté\r\nB02\tHiver\r\n".encode(codec))
    users = write(tmp_path, "users.tsv", bom + "U1\tB01 B02\r\n".encode(codec))
    catalog = read_items(items, encoding=encoding)
    assert (catalog.ids, catalog.titles) == (["B01", "B02"], ["Été", "Hiver"])  # the mark is no part of an id
    assert read_users(users, encoding=encoding) == [("U1", ["B01", "B02"])]


def test_a_carriage_return_inside_a_line_is_named_on_its_line_and_column(tmp_path, capsys):
    items = write(tmp_path, "items.tsv", b"a\tA\nb\tB\nc\tC\nB00JB1KAZY\tHig\rh Temperature\ne\tE\n")
    users = write(tmp_path, "users.tsv", b"u1\ta b c e\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["data-stats", "--users", str(users), "--items", str(items)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{items}:4: a carriage return (CR) inside the line at column 15; lines end in LF or CRLF" in err
    with pytest.raises(DataError, match=rf"^{at(tmp_path)}/u.tsv:2: a carriage return \(CR\) inside the line at "
                                        "column 5"):
        read_users(write(tmp_path, "u.tsv", b"u1\ta b\r\nu2\ta\rb\r\n"))


def test_a_file_of_cr_ended_lines_is_refused_and_crlf_is_read(tmp_path):
    mac = write(tmp_path, "items.tsv", b"a\tA\rb\tB\rc\tC\r")
    with pytest.raises(DataError, match=rf"^{at(mac)}:1: a carriage return \(CR\) inside the line at column 4; "
                                        r".* all end in CR alone"):
        read_items(mac)
    crlf = write(tmp_path, "crlf.tsv", b"a\tA\r\nb\tB\r\n\r\nc\tC")
    catalog = read_items(crlf)
    assert (catalog.ids, catalog.titles) == (["a", "b", "c"], ["A", "B", "C"])
    assert read_users(write(tmp_path, "users.tsv", b"u1\ta b\r\n")) == [("u1", ["a", "b"])]
    assert read_items(write(tmp_path, "last.tsv", b"a\tA\r")).titles == ["A"]  # a last line ending in CR alone
    with pytest.raises(DataError, match=r"last2.tsv:1: .* at column 4"):
        read_items(write(tmp_path, "last2.tsv", b"a\tA\r\r\n"))


def test_csv_lines_are_counted_at_lf_only(tmp_path):
    titles = write(tmp_path, "items.csv", b'item,title\n1,"multi\nline"\n2,"x\ry"\n3,ok\r\n4,a,b\n')
    with pytest.raises(DataError, match=rf"^{at(titles)}:6: 3 fields, the header has 2"):
        read_items(titles)
    titles.write_bytes(b'item,title\n1,"multi\nline"\n2,"x\ry"\n3,ok\r\n')
    catalog = read_items(titles)
    assert (catalog.ids, catalog.titles) == (["1", "2", "3"], ["multi\nline", "x\ry", "ok"])  # as quoted


def test_a_csv_of_cr_ended_lines_or_a_cr_outside_quotes_is_refused(tmp_path):
    mac = write(tmp_path, "items.csv", b"item,title\r1,a\r2,b\r")
    outside = r"a carriage return \(CR\) inside the line, outside quotes; lines end in LF or CRLF"
    with pytest.raises(DataError, match=rf"^{at(mac)}:1: {outside}"):
        read_items(mac)
    stray = write(tmp_path, "pairs.csv", b"user,item,timestamp\nu1,a,1\nu1,b\r,2\n")
    with pytest.raises(DataError, match=rf"^{at(stray)}:3: {outside}"):
        read_users(stray)


def test_a_space_separated_history_is_told_that_ids_are_comma_separated():
    run = SimpleNamespace(data=SimpleNamespace(item_ids=["", "B0098MLBAO", "B00E8JOCOE"], num_items=2),
                          cfg=SimpleNamespace(items="items.tsv"))
    run.positions = TrainedRun.positions.func(run)  # (the cached property, on this stand-in)
    with pytest.raises(DataError, match=r"^--history: item id\(s\) 'B0098MLBAO B00E8JOCOE' are not among the 2 items "
                                        r".*; item ids are comma-separated: 'B0098MLBAO,B00E8JOCOE'$"):
        TrainedRun.item_index(run, ["B0098MLBAO B00E8JOCOE"])
    with pytest.raises(DataError, match=r"by the protocol\)$"):  # no hint where there is no space
        TrainedRun.item_index(run, ["nothing"])
    assert TrainedRun.item_index(run, ["B00E8JOCOE", "B0098MLBAO"]).tolist() == [2, 1]


def test_a_long_network_error_keeps_its_head_and_its_cause_cut_at_words():
    cause = "Failed to resolve 'drive.google.com' ([Errno -3] Name or service not known)"
    text = "ConnectionError: HTTPSConnectionPool(host='drive.google.com', port=443): " + "retry " * 80 + cause
    short = shortened(text)
    assert len(short) <= 300 and short.endswith(cause) and short.startswith("ConnectionError: HTTPSConnectionPool")
    head, tail = short.split(" … ")
    assert text.startswith(head + " ") and text.endswith(" " + tail)  # whole words on both sides of the cut
    assert shortened("short message") == "short message"
    assert len(shortened("x" * 1000)) <= 300
