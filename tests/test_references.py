from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from emofleet.streams.references import (
    MAX_ATTRIBUTES, InvalidReference, ItemError, PathMapping, audio_id_for, make_reference, map_file_uri, message_key,
    parse_path_mapping, references_from_manifest, references_from_paths,
)


def test_paths_dirs_and_globs_become_file_references(tmp_path: Path) -> None:
    (tmp_path / "calls").mkdir()
    for name in ("a.wav", "b.flac", "notes.txt"):
        (tmp_path / "calls" / name).write_bytes(b"x")

    items = list(references_from_paths([str(tmp_path / "calls"), str(tmp_path / "calls" / "*.wav")]))

    uris = [item["uri"] for item in items]
    assert uris == [(tmp_path / "calls" / n).as_uri() for n in ("a.wav", "b.flac", "a.wav")]
    assert items[0]["audio_id"] == items[2]["audio_id"], "the same file always gets the same audio_id"


def test_missing_paths_and_empty_globs_are_item_errors(tmp_path: Path) -> None:
    (tmp_path / "ok.wav").write_bytes(b"x")

    items = list(references_from_paths([str(tmp_path / "missing.wav"), str(tmp_path / "*.mp3"),
                                        str(tmp_path / "ok.wav")]))

    errors = [i for i in items if isinstance(i, ItemError)]
    assert [e.reason for e in errors] == ["no such file", "no file matches this pattern"]
    assert sum(not isinstance(i, ItemError) for i in items) == 1, "the good item is still there"


def test_manifest_jsonl_bad_lines_are_reported_and_the_rest_kept(tmp_path: Path) -> None:
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"uri": "s3://bucket/a.wav", "call_id": "c1", "tenant": "t"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"uri": "ftp://host/a.wav"}),
        json.dumps({"uri": "https://cdn.example.com/b.wav", "attributes": {"lang": "en"}}),
        json.dumps({"audio_id": "no-uri"}),
        json.dumps({"uri": "s3://b/c.wav", "surprise": 1}),
    ]) + "\n")

    items = list(references_from_manifest(manifest))

    errors = {e.item: e.reason for e in items if isinstance(e, ItemError)}
    assert set(errors) == {"refs.jsonl:2", "refs.jsonl:3", "refs.jsonl:4", "refs.jsonl:6", "refs.jsonl:7"}
    assert "not valid JSON" in errors["refs.jsonl:2"]
    assert "ftp" in errors["refs.jsonl:4"]
    assert "uri" in errors["refs.jsonl:6"]
    assert "surprise" in errors["refs.jsonl:7"]
    good = [i for i in items if not isinstance(i, ItemError)]
    assert [g["uri"] for g in good] == ["s3://bucket/a.wav", "https://cdn.example.com/b.wav"]
    assert good[1]["attributes"] == {"lang": "en"}


def test_manifest_csv_with_attribute_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "refs.csv"
    manifest.write_text("uri,call_id,attr.lang\nhttps://h/a.wav,c9,de\nnot-a-uri,,\nhttps://h/b.wav,c9,x,extra\n")

    items = list(references_from_manifest(manifest))

    assert items[0]["attributes"] == {"lang": "de"} and items[0]["call_id"] == "c9"
    assert isinstance(items[1], ItemError) and "scheme" in items[1].reason
    assert isinstance(items[2], ItemError) and "more cells" in items[2].reason


@pytest.mark.parametrize(("raw", "message"), [
    ({"uri": "file://otherhost/x.wav"}, "file:///absolute"),
    ({"uri": "https:///nohost.wav"}, "no host"),
    ({"uri": "s3://b/x.wav\n"}, None),  # trailing whitespace is trimmed, not an error
    ({"uri": "s3://b/\x00.wav"}, "control characters"),
    ({"uri": "s3://b/" + "x" * 5000}, "characters"),
    ({"uri": "s3://b/x.wav", "attributes": {f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}}, "attributes"),
    ({"uri": "s3://b/x.wav", "attributes": {"k": "v" * 5000}}, "longer"),
    ({"uri": "s3://b/x.wav", "call_id": "c" * 300}, "call_id"),
    ({"uri": "s3://b/x.wav", "attributes": {"k": {"nested": 1}}}, "string"),
])
def test_invalid_items_get_a_clear_reason(raw: dict, message: str | None) -> None:
    if message is None:
        assert make_reference(raw)["uri"] == "s3://b/x.wav"
        return
    with pytest.raises(InvalidReference, match=message):
        make_reference(raw)


def test_message_key_groups_a_call_and_falls_back_to_audio_id() -> None:
    a = make_reference({"uri": "s3://b/1.wav", "call_id": "call-7", "tenant": "acme"})
    b = make_reference({"uri": "s3://b/2.wav", "call_id": "call-7", "tenant": "acme"})
    c = make_reference({"uri": "s3://b/3.wav"})

    assert message_key(a) == message_key(b) == b"acme/call-7"
    assert message_key(c) == c["audio_id"].encode()


# ------------------------------------------------------------------------------------------ --path-map

AUDIO = [PathMapping(PurePosixPath("/home/me/audio"), PurePosixPath("/audio")),
         PathMapping(PurePosixPath("/home/me/audio/vip"), PurePosixPath("/vip"))]


@pytest.mark.parametrize(("uri", "expected"), [
    ("file:///home/me/audio/a.wav", "file:///audio/a.wav"),
    ("file:///home/me/audio/2026/11/b%20c.wav", "file:///audio/2026/11/b%20c.wav"),  # encoding kept
    ("file:///home/me/audio/vip/x.wav", "file:///vip/x.wav"),  # the longest matching directory wins
    ("s3://bucket/home/me/audio/a.wav", "s3://bucket/home/me/audio/a.wav"),  # only file:// moves
])
def test_map_file_uri_moves_paths_into_the_target(uri: str, expected: str) -> None:
    assert map_file_uri(uri, AUDIO) == expected


def test_map_file_uri_refuses_paths_outside_every_mapping() -> None:
    assert map_file_uri("file:///elsewhere/a.wav", []) == "file:///elsewhere/a.wav", "no mapping, no change"
    with pytest.raises(InvalidReference, match="under none of the mapped directories"):
        map_file_uri("file:///home/me/audio2/a.wav", AUDIO)  # a prefix of the name is not the directory


@pytest.mark.parametrize(("text", "expected"), [
    ("/srv/audio:/audio", PathMapping(PurePosixPath("/srv/audio"), PurePosixPath("/audio"))),
    ("./audio:/audio", PathMapping(PurePosixPath("audio"), PurePosixPath("/audio"))),
    ("/mnt/a:b:/audio", PathMapping(PurePosixPath("/mnt/a:b"), PurePosixPath("/audio"))),
])
def test_parse_path_mapping(text: str, expected: PathMapping) -> None:
    assert parse_path_mapping(text) == expected


@pytest.mark.parametrize(("text", "message"), [("/audio", "SOURCE:TARGET"), (":/audio", "SOURCE:TARGET"),
                                               ("./audio:audio", "absolute")])
def test_parse_path_mapping_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidReference, match=message):
        parse_path_mapping(text)


def test_paths_and_manifests_publish_the_mapped_uri_and_its_audio_id(tmp_path: Path) -> None:
    (tmp_path / "calls").mkdir()
    (tmp_path / "calls" / "a.wav").write_bytes(b"x")
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text(json.dumps({"uri": (tmp_path / "calls" / "b.wav").as_uri()}) + "\n")
    path_map = [PathMapping(PurePosixPath(tmp_path.resolve()), PurePosixPath("/audio"))]

    (from_path,) = references_from_paths([str(tmp_path / "calls")], path_map=path_map)
    (from_manifest,) = references_from_manifest(manifest, path_map=path_map)

    assert from_path["uri"] == "file:///audio/calls/a.wav"
    assert from_path["audio_id"] == audio_id_for("file:///audio/calls/a.wav"), "the id of what processors read"
    assert from_manifest["uri"] == "file:///audio/calls/b.wav"
