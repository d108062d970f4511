import pytest

from pipeline.errors import ConfigError
from pipeline.s3keys import is_s3_uri, join_key, parse_s3_uri, relative_key

URIS = [
    ("s3://bucket/some/prefix/", ("bucket", "some/prefix/")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/a.jpg", ("bucket", "a.jpg")),
    ("s3://my.bucket-1/in", ("my.bucket-1", "in")),
    ("s3://abc/a b/ü.jpg", ("abc", "a b/ü.jpg")),
]


@pytest.mark.parametrize(("uri", "expected"), URIS)
def test_parse_s3_uri(uri, expected):
    assert is_s3_uri(uri)
    assert parse_s3_uri(uri) == expected


BAD_URIS = [
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("s3://ab/x", "invalid S3 bucket name 'ab'"),
    ("s3://My_Bucket/x", "invalid S3 bucket name 'My_Bucket'"),
    ("s3://bucket-/x", "invalid S3 bucket name"),
    ("s3://bu cket/x", "invalid S3 bucket name"),
    ("s3://" + "b" * 64, "invalid S3 bucket name"),
    ("/local/folder", "not an S3 URI"),
    ("S3://bucket/x", "not an S3 URI"),
    ("https://bucket.s3.amazonaws.com/x", "not an S3 URI"),
]


@pytest.mark.parametrize(("uri", "message"), BAD_URIS)
def test_parse_s3_uri_errors(uri, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as info:
        parse_s3_uri(uri)
    assert info.value.stage == "config"


@pytest.mark.parametrize("text", ["/data/in", "in", "", "s3:/bucket", "S3://bucket"])
def test_not_s3_uris(text):
    assert not is_s3_uri(text)


RELATIVE = [
    # (key, prefix, expected)
    ("in/a.jpg", "in/", "a.jpg"),
    ("in/sub/a.jpg", "in", "sub/a.jpg"),  # prefix without "/" is the same folder
    ("a.jpg", "", "a.jpg"),
    ("../../etc/passwd", "", "etc/passwd"),
    ("in/../../etc/passwd", "in/", "etc/passwd"),
    ("/abs/x.jpg", "", "abs/x.jpg"),
    ("in//abs/x.jpg", "in/", "abs/x.jpg"),
    ("a/./b/../c.png", "", "a/b/c.png"),
    ("a//b.png", "", "a/b.png"),
    ("new\nline.png", "", "new_line.png"),
    ("tab\tname.png", "", "tab_name.png"),
    ("del\x7f\x85.png", "", "del__.png"),  # DEL and a C1 control
    ("ünï/ok.png", "", "ünï/ok.png"),
    ("in/a photo+1.png", "in/", "a photo+1.png"),
    ("in/", "in/", "_"),  # the console's "folder" object: nothing left
    ("..", "", "_"),
    ("in/a.jpg", "in/a.jpg", "a.jpg"),  # key equal to the prefix: a single object named as the input
    ("a.jpg", "a.jpg", "a.jpg"),
]


@pytest.mark.parametrize(("key", "prefix", "expected"), RELATIVE)
def test_relative_key(key, prefix, expected):
    assert relative_key(key, prefix) == expected


NOT_UNDER = [("out/a.jpg", "in/"), ("inbox/a.jpg", "in"), ("in", "in/"), ("", "in/")]


@pytest.mark.parametrize(("key", "prefix"), NOT_UNDER)
def test_relative_key_not_under_the_prefix(key, prefix):
    with pytest.raises(ValueError, match="not under the prefix"):
        relative_key(key, prefix)


JOIN = [("", "a.jpg", "a.jpg"), ("out", "a.jpg", "out/a.jpg"), ("out/", "sub/a.jpg", "out/sub/a.jpg"), ("out", "", "out/")]


@pytest.mark.parametrize(("prefix", "rel", "expected"), JOIN)
def test_join_key(prefix, rel, expected):
    assert join_key(prefix, rel) == expected


def test_relative_then_join_maps_the_tree_to_another_prefix():
    assert join_key("out", relative_key("in/sub/../x\n.png", "in")) == "out/sub/x_.png"
