"""The raw-format parsers (msmarco/formats.py): mojibake repair, and a malformed line anywhere in a numeric row file
is a DataError naming the file and line, which leaves no half-built store."""
import io
import tarfile
import warnings

import numpy as np
import pytest

from msmarco import errors, formats, paths
from msmarco.data import MSMarco
from conftest import TEACHER, TRIPLES, leftovers, rewrite_text


@pytest.mark.parametrize("text, expected", [
    ("donâ\x80\x99t", "don’t"),
    ("café", "café"),  # legit latin-1 that is not UTF-8 bytes: kept
    ("plain ascii text", "plain ascii text"),
    ("", ""),
    ("194 â¦ 2-1946", "194 â¦ 2-1946"),  # partial sequence: kept
    ("日本", "日本"),  # not latin-1 at all: kept
    ("â\x80\x9cquoteâ\x80\x9d", "“quote”"),
    # mixed in one passage (as in the official collection): each double-encoded sequence repaired on its own
    ("Maktoum (1878â\x80\x931958) (Arabic: سعيد)", "Maktoum (1878–1958) (Arabic: سعيد)"),
    ("AntonÃ\xadn DvoÅÃ¡k â¦", "Antonín DvoÅák â¦"),  # Å lost its continuation byte: kept, as is â¦
    ("café donâ\x80\x99t", "café don’t"),  # a legit latin-1 é beside a double-encoded ’
    ("\xe0\x80\x80 and \xed\xa0\x80 日本", "\xe0\x80\x80 and \xed\xa0\x80 日本"),  # overlong, surrogate: not UTF-8
])
def test_fix_mojibake(text, expected):
    assert formats.fix_mojibake(text) == expected


BAD_TEACHER_LINES = {
    "4 fields": lambda f: b"\t".join(f[:4]),
    "6 fields": lambda f: b"\t".join(f + [b"1"]),
    "abc score": lambda f: b"\t".join([b"abc"] + f[1:]),
    "negative pid": lambda f: b"\t".join(f[:3] + [b"-" + f[3]] + f[4:]),
    "fractional qid": lambda f: b"\t".join(f[:2] + [f[2] + b".5"] + f[3:]),
    "nan score": lambda f: b"\t".join([b"nan"] + f[1:]),
    "empty line": lambda f: b"",
}


@pytest.mark.parametrize("kind", list(BAD_TEACHER_LINES))
def test_teacher_malformed_line(copy, kind):
    src = copy / TEACHER
    good = src.read_bytes()
    lineno = 1_234

    def edit(lines):
        lines[lineno - 1] = BAD_TEACHER_LINES[kind](lines[lineno - 1].split(b"\t"))
        return lines
    rewrite_text(src, edit)
    with pytest.raises(errors.DataError) as e:
        MSMarco(copy).teacher_scores()
    msg = str(e.value)
    assert str(src) in msg
    assert f"line {lineno}:" in msg
    left = leftovers(copy)
    assert "teacher" not in left
    assert not [n for n in left if ".tmp-" in n]
    # repaired: the next run builds it
    src.write_bytes(good)
    rec = MSMarco(copy).teacher_scores()
    assert len(rec) == 9_361
    assert (copy / paths.PREPARED / "teacher" / "meta.json").exists()


def test_teacher_compensating_malformed_lines(copy):
    src = copy / TEACHER

    def edit(lines):  # move the last field of line 10 to the start of line 11
        f10, f11 = lines[9].split(b"\t"), lines[10].split(b"\t")
        lines[9] = b"\t".join(f10[:4])
        lines[10] = b"\t".join([f10[4]] + f11)
        return lines
    rewrite_text(src, edit)
    with pytest.raises(errors.DataError, match="line 10"):
        MSMarco(copy).teacher_scores()


@pytest.mark.parametrize("name", [TEACHER, TRIPLES])
def test_qid_out_of_int32_range(copy, name):
    col = 2 if name == TEACHER else 0

    def edit(lines):
        f = lines[0].split(b"\t")
        f[col] = b"3000000000"
        lines[0] = b"\t".join(f)
        return lines
    rewrite_text(copy / name, edit)
    m = MSMarco(copy)
    with pytest.raises(errors.DataError, match="line 1:"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy: invalid value encountered in cast
        m.teacher_scores() if name == TEACHER else m.triples()


def test_triples_malformed_line(copy):
    src = copy / TRIPLES

    def edit(lines):
        lines[99] = b"1\t2"
        return lines
    rewrite_text(src, edit)
    with pytest.raises(errors.DataError) as e:
        MSMarco(copy).triples()
    assert str(src) in str(e.value) and "line 100:" in str(e.value)
    assert not [n for n in leftovers(copy) if n.startswith("triples")]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 11, 24, 25, 64, 1 << 20])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_int_rows_do_not_depend_on_where_the_blocks_cut(tmp_path, chunk_bytes, trailing_newline):
    """Every cut of the file into read blocks gives the same rows, also a block that holds no newline (a line
    longer than a block, or the last line without its newline crossing a block boundary): such a block only
    extends the pending line."""
    rows = [(1185869, 7, 123), (5, 8841822, 0), (42, 1, 99999), (3, 3, 3)]
    text = "\n".join("\t".join(map(str, r)) for r in rows) + ("\n" if trailing_newline else "")
    path = tmp_path / "rows.tsv"
    path.write_text(text)
    got = np.concatenate([a for _, a in formats.iter_int_rows(path, 3, "rows", chunk_bytes=chunk_bytes, kinds="iii")])
    assert got.astype(int).tolist() == [list(r) for r in rows]


def test_an_archive_without_the_member_says_what_to_do(tmp_path):
    """A .tar.gz that lacks the file the scripts read from it (not the published archive) is a DataError naming the
    archive, the member and the remedy."""
    path = tmp_path / "queries.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("queries.eval.tsv")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"1\tq\n"))
    with pytest.raises(errors.DataError, match="holds no member named 'queries.train.tsv': it is not the published "
                                               "archive; delete it and download it again"):
        formats.open_binary(path, "queries.train.tsv")
