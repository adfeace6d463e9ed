"""Corpus manifests (CSV, JSONL) and folders: parsed rows, path resolution, and typed errors per line."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from umt_distill.data.corpus import ClipRow, CorpusError, corpus_digest, read_corpus


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_csv_manifest(tmp_path: Path) -> None:
    manifest = _write(
        tmp_path / "data" / "m.csv",
        "id,path,label,captions,start,end,split\n"
        "a,videos/a.mp4,3,a dog runs,,,train\n"
        'b,/abs/b.mkv,jumping,"[""one"", ""two, with comma""]",1.5,4,val\n'
        "c,c.jpg,,,0,2.25,\n"
        "\n"  # blank lines are skipped
        's3,s3://bucket/x.mp4,-1,"a ""quoted"" caption",,,\n',
    )
    rows = read_corpus(manifest)
    folder = os.path.abspath(tmp_path / "data")
    assert rows == [
        ClipRow("a", f"{folder}/videos/a.mp4", 3, ("a dog runs",)),
        ClipRow("b", "/abs/b.mkv", "jumping", ("one", "two, with comma"), 1.5, 4.0),
        ClipRow("c", f"{folder}/c.jpg", None, (), 0.0, 2.25),
        ClipRow("s3", "s3://bucket/x.mp4", -1, ('a "quoted" caption',)),
    ]
    # root overrides the manifest's folder for relative paths only
    rooted = read_corpus(manifest, root=tmp_path / "elsewhere")
    assert rooted[0].path == os.path.abspath(tmp_path / "elsewhere" / "videos" / "a.mp4")
    assert rooted[1].path == "/abs/b.mkv"


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", b"\xef\xbb\xbfid,path\r\nx,x.mp4\r\ny,y.mp4\r\n")
    assert [r.id for r in read_corpus(manifest)] == ["x", "y"]


def test_jsonl_manifest(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "path": "a.mp4", "label": 7, "captions": "one caption", "start": 0, "end": 1.5},
        {"id": 12, "path": "sub/b.mp4", "captions": ["x", "y"], "label": "cat", "duration": 9.0},
        {"id": "c", "path": "c.png", "label": None, "captions": None, "start": None},
    ]
    manifest = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_corpus(manifest)
    base = os.path.abspath(tmp_path)
    assert rows == [
        ClipRow("a", f"{base}/a.mp4", 7, ("one caption",), 0.0, 1.5),
        ClipRow("12", f"{base}/sub/b.mp4", "cat", ("x", "y")),
        ClipRow("c", f"{base}/c.png"),
    ]


def test_folder_source(tmp_path: Path) -> None:
    for name in ("b.mp4", "a/clip.MKV", "a/img.jpg", "z.webp", "notes.txt", ".hidden.mp4", "._b.mp4",
                 ".cache/x.mp4"):
        _write(tmp_path / "corpus" / name, b"x")
    rows = read_corpus(tmp_path / "corpus", root="/ignored")
    assert [r.id for r in rows] == ["a/clip", "a/img", "b", "z"]
    assert rows[0].path == os.path.abspath(tmp_path / "corpus" / "a" / "clip.MKV")
    assert all(r.label is None and r.captions == () and r.start is None for r in rows)


def test_missing_video_files_are_not_manifest_errors(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", "id,path\ngone,does/not/exist.mp4\n")
    assert read_corpus(manifest)[0].path.endswith("does/not/exist.mp4")


def test_digest_is_order_sensitive_and_covers_paths_and_times() -> None:
    a, b = ClipRow("a", "/a.mp4"), ClipRow("b", "/b.mp4")
    digest = corpus_digest([a, b])
    assert len(digest) == 64 and digest == corpus_digest([ClipRow("a", "/a.mp4"), ClipRow("b", "/b.mp4")])
    assert digest != corpus_digest([b, a])
    assert digest != corpus_digest([ClipRow("a", "/other.mp4"), b])
    assert digest != corpus_digest([ClipRow("a", "/a.mp4", start=0.0), b])
    assert digest != corpus_digest([ClipRow("a", "/a.mp4", end=1.0), b])
    assert digest == corpus_digest([ClipRow("a", "/a.mp4", label=5, captions=("c",)), b])  # not content


CSV_ERRORS = {
    "missing column": ("id,video\na,a.mp4\n", 1, "missing required column.*path"),
    "duplicate id": ("id,path\na,a.mp4\nb,b.mp4\na,c.mp4\n", 4, "duplicate id 'a' .first on line 2"),
    "non-numeric start": ("id,path,start\na,a.mp4,soon\n", 2, "start must be a number"),
    "negative end": ("id,path,end\na,a.mp4,-1\n", 2, "non-negative"),
    "nan start": ("id,path,start\na,a.mp4,nan\n", 2, "finite"),
    "start >= end": ("id,path,start,end\na,a.mp4,1,2\nb,b.mp4,3,3\n", 3, "start .3.0. must be before end"),
    "empty id": ("id,path\n  ,a.mp4\n", 2, "empty or non-string id"),
    "empty path": ("id,path\na,\n", 2, "empty or non-string path"),
    "too many fields": ("id,path\na,a.mp4,extra\n", 2, "expected 2 fields, got 3"),
    "bad captions list": ('id,path,captions\na,a.mp4,"[""x"", oops]"\n', 2, "not a JSON list"),
    "misspelt column": ("id,path,caption\na,a.mp4,hi\n", 1, "did you mean 'captions'"),
    "empty file": ("", 1, "header"),
    "line of a multi-line row": ('id,path,captions\na,a.mp4,"two\nlines"\nb,,\n', 4, "empty or non-string path"),
}


@pytest.mark.parametrize("case", sorted(CSV_ERRORS))
def test_csv_errors_name_file_line_and_reason(tmp_path: Path, case: str) -> None:
    text, line, reason = CSV_ERRORS[case]
    manifest = _write(tmp_path / "m.csv", text)
    with pytest.raises(CorpusError, match=reason) as info:
        read_corpus(manifest)
    assert (info.value.path, info.value.line) == (str(manifest), line)
    assert str(info.value).startswith(f"{manifest}:{line}: ")


JSONL_ERRORS = {
    "bad json": ('{"id": "a", "path": "a.mp4"}\n{"id": "b", "path": \n', 2, "bad JSON"),
    "not an object": ('["a", "a.mp4"]\n', 1, "expected a JSON object"),
    "missing key": ('{"id": "a"}\n', 1, "missing required key.*path"),
    "string start": ('{"id": "a", "path": "a.mp4", "start": "1.0"}\n', 1, "start must be a number"),
    "bool end": ('{"id": "a", "path": "a.mp4", "end": true}\n', 1, "end must be a number"),
    "start >= end": ('{"id": "a", "path": "a.mp4", "start": 2, "end": 1}\n', 1, "before end"),
    "captions type": ('{"id": "a", "path": "a.mp4", "captions": [1, 2]}\n', 1, "list of strings"),
    "empty caption": ('{"id": "a", "path": "a.mp4", "captions": ["ok", " "]}\n', 1, "caption 1 is empty"),
    "float label": ('{"id": "a", "path": "a.mp4", "label": 1.5}\n', 1, "label must be"),
    "null id": ('{"id": null, "path": "a.mp4"}\n', 1, "non-string id"),
    "duplicate id": ('{"id": "a", "path": "a.mp4"}\n\n{"id": "a", "path": "b.mp4"}\n', 3, "duplicate id"),
}


@pytest.mark.parametrize("case", sorted(JSONL_ERRORS))
def test_jsonl_errors_name_file_line_and_reason(tmp_path: Path, case: str) -> None:
    text, line, reason = JSONL_ERRORS[case]
    manifest = _write(tmp_path / "m.jsonl", text)
    with pytest.raises(CorpusError, match=reason) as info:
        read_corpus(manifest)
    assert (info.value.path, info.value.line) == (str(manifest), line)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_bytes_name_their_line(tmp_path: Path, suffix: str) -> None:
    body = b"id,path\na,a.mp4\nb,caf\xe9.mp4\n" if suffix == ".csv" else (
        b'{"id": "a", "path": "a.mp4"}\n{"id": "b", "path": "caf\xe9.mp4"}\n'
    )
    manifest = _write(tmp_path / f"m{suffix}", body)
    with pytest.raises(CorpusError, match="not valid UTF-8") as info:
        read_corpus(manifest)
    assert info.value.line == (3 if suffix == ".csv" else 2)


def test_source_level_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.csv")
    with pytest.raises(CorpusError, match="unsupported manifest type '.txt'"):
        read_corpus(_write(tmp_path / "m.txt", "id,path\n"))
    with pytest.raises(CorpusError, match="no rows"):
        read_corpus(_write(tmp_path / "m.csv", "id,path\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no videos or images"):
        read_corpus(tmp_path / "empty")
    _write(tmp_path / "dup" / "a.mp4", b"x")
    _write(tmp_path / "dup" / "a.jpg", b"x")
    with pytest.raises(CorpusError, match="two files map to id 'a'"):
        read_corpus(tmp_path / "dup")


def test_error_pickles_with_fields() -> None:
    err = pickle.loads(pickle.dumps(CorpusError("/m.csv", 3, "duplicate id 'a'")))
    assert (err.path, err.line, err.reason, str(err)) == ("/m.csv", 3, "duplicate id 'a'", "/m.csv:3: duplicate id 'a'")
    assert isinstance(err, ValueError)
