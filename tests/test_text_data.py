"""Raw-text data: the JSONL/TSV/CSV reader, its errors, label vocabularies and label matrices."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from xmc_toolkit.data.text import (
    TextData,
    label_matrix,
    label_vocabulary,
    read_text,
    text_dataset,
    text_format,
)
from xmc_toolkit.errors import DataFormatError

RECORDS = [
    {"id": "r1", "text": "the cat sat on the mat", "labels": ["animal", "home"]},
    {"id": "r2", "text": "a dog ran in the park", "labels": ["animal", "outdoor"]},
    {"id": "r3", "text": "nothing to see here", "labels": []},
]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_records(tmp_path):
    d = read_text(_jsonl(tmp_path / "a.jsonl", RECORDS))
    assert d.texts == [r["text"] for r in RECORDS]
    assert d.labels == [r["labels"] for r in RECORDS]
    assert d.ids == ["r1", "r2", "r3"]
    np.testing.assert_array_equal(d.lines, [1, 2, 3])
    assert len(d) == 3


def test_field_names_and_no_ids(tmp_path):
    recs = [{"body": r["text"], "tags": r["labels"]} for r in RECORDS]
    d = read_text(_jsonl(tmp_path / "a.jsonl", recs), text_field="body", label_field="tags")
    assert d.labels == [r["labels"] for r in RECORDS] and d.ids is None


def test_labels_optional_for_prediction(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    assert read_text(p, labels_required=False).labels is None
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: record has no label field 'labels'"):
        read_text(p)


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open),
                                           (".xz", lzma.open)])
def test_compressed_jsonl(tmp_path, suffix, opener):
    p = tmp_path / f"a.jsonl{suffix}"
    with opener(p, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert text_format(p) == "jsonl"
    assert read_text(p).texts == [r["text"] for r in RECORDS]


def test_tsv_and_csv(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\ttext\tlabels\nr1\tthe cat, the mat\tanimal|home\nr2\ta dog\t\n")
    d = read_text(tsv)
    assert d.texts == ["the cat, the mat", "a dog"] and d.labels == [["animal", "home"], []]
    assert d.ids == ["r1", "r2"]
    csv_ = tmp_path / "a.csv"
    csv_.write_text('text,labels\n"the cat, ""quoted"", sat",animal;home\nplain,outdoor\n')
    d = read_text(csv_, label_sep=";")
    assert d.texts == ['the cat, "quoted", sat', "plain"]
    assert d.labels == [["animal", "home"], ["outdoor"]]
    np.testing.assert_array_equal(d.lines, [2, 3])


@pytest.mark.parametrize("line,message", [
    (b'{"text": "a", "labels": ["x"]', r"not valid JSON"),
    (b'["a", ["x"]]', r"a JSON list, not an object"),
    (b'{"labels": ["x"]}', r"record has no text field 'text'.*--text-field"),
    (b'{"text": "a"}', r"record has no label field 'labels'.*--label-field"),
    (b'{"text": "a", "labels": [3]}', r"label 3 in field 'labels' is int; labels must be strings"),
    (b'{"text": "a", "labels": "x"}', r"field 'labels' is str .*must be a list of strings"),
    (b'{"text": "   ", "labels": ["x"]}', r"empty text in field 'text'"),
    (b'{"text": 7, "labels": ["x"]}', r"field 'text' is int"),
    (b'{"text": "a", "labels": ["x", "x"]}', r"label 'x' appears twice"),
    (b'{"text": "a", "labels": [""]}', r"empty label"),
    (b'{"text": "caf\xe9", "labels": ["x"]}', r"byte 0xe9 at column 14 is not valid UTF-8"),
    (b"", r"blank line"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "fine", "labels": ["x"]}\n' + line + b"\n")
    with pytest.raises(DataFormatError, match=message) as info:
        read_text(p)
    assert str(info.value).startswith(f"{p}:2: ")
    assert "\n" not in str(info.value)


def test_bad_tables(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("body\tlabels\nx\ty\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:1: no column 'text' in the header"):
        read_text(p)
    p.write_text("text\tlabels\nx\ty\tz\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:2: 3 columns but the header has 2"):
        read_text(p)
    p.write_text("text\tlabels\nx\ta||b\n")
    with pytest.raises(DataFormatError, match=r"a\.tsv:2: empty label"):
        read_text(p)
    p.write_text("")
    with pytest.raises(DataFormatError, match="empty file"):
        read_text(p)
    with pytest.raises(DataFormatError, match="not a text data file"):
        read_text(tmp_path / "a.txt")


def test_label_vocabulary_and_matrix():
    labels = [["b", "a"], [], ["c", "a"]]
    names = label_vocabulary(labels)
    assert names == ["a", "b", "c"]
    Y, dropped = label_matrix(labels, names)
    assert dropped == 0 and Y.shape == (3, 3) and Y.dtype == np.float32
    np.testing.assert_array_equal(Y.toarray(), [[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    with pytest.raises(DataFormatError, match=r"t\.jsonl:7: label 'z' is not one of the model's 3 "
                       r"labels; use --ignore-extra"):
        label_matrix([["a"], ["z"]], names, path="t.jsonl", lines=np.array([3, 7]))
    Y, dropped = label_matrix([["a", "z"], ["z", "y"]], names, ignore_extra=True)
    assert dropped == 3 and Y.nnz == 1


def test_text_dataset_uses_the_featurizer():
    class Count:
        def transform(self, texts):
            import scipy.sparse as sp

            return sp.csr_matrix(np.array([[len(t)] for t in texts], dtype=np.float32))

    d = TextData(["ab", "abc"], [["x"], ["y", "x"]], None, "p", np.array([1, 2]))
    ds = text_dataset(d, Count(), ["x", "y"])
    assert ds.X.toarray().ravel().tolist() == [2, 3] and ds.Y.toarray().tolist() == [[1, 0],
                                                                                    [1, 1]]
    assert ds.label_names == ["x", "y"]


def test_kjv_jsonl_matches_the_xc_files(shared_data):
    real = shared_data / "real"
    path = real / "kjv-strongs_train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    d = read_text(path)
    names = (real / "kjv-strongs_labels.txt").read_text().split()
    assert len(d) == 24879
    assert label_vocabulary(d.labels) == sorted(names)  # every label occurs in train
    assert d.ids[0] == (real / "kjv-strongs_rows_train.txt").read_text().splitlines()[0]


def test_truncated_compressed_file_is_one_error(tmp_path):
    packed = bz2.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS * 50))
    p = tmp_path / "cut.jsonl.bz2"
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.jsonl\.bz2: cannot decompress the file"):
        read_text(p)


def test_feature_loader_names_raw_text(tmp_path):
    from xmc_toolkit.data import load

    with pytest.raises(DataFormatError, match="holds raw text records, not feature vectors"):
        load(_jsonl(tmp_path / "a.jsonl", RECORDS))
