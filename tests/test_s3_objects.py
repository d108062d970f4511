"""S3Objects over real HTTP against moto's server: pagination, size limits, whole-object publishes, failure records."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import boto3
import pytest
from botocore.config import Config
from moto_server import client, free_port

from pipeline.adapters.s3_objects import ObjectInfo, S3Objects, s3_client
from pipeline.errors import ConfigError, InputRejected, TransientError

MIB = 1024 * 1024


@pytest.fixture
def raw(moto_endpoint):
    """A plain boto3 client for setting up and checking, with one bucket "inbox"."""
    s3 = client("s3", moto_endpoint)
    s3.create_bucket(Bucket="inbox")
    return s3


@pytest.fixture
def objects(moto_endpoint) -> S3Objects:
    return S3Objects(s3_client(moto_endpoint))


def test_list_pages_through_thousands_of_keys_and_skips_folders(moto_endpoint, raw, objects):
    # more connections than boto3's default 10, so 16 threads do not queue for them
    bulk = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                        config=Config(max_pool_connections=16))
    keys = [f"photos/{i:05d}.png" for i in range(2500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: bulk.put_object(Bucket="inbox", Key=k, Body=b"x" * 3), keys))
    for other in ("photos2/a.png", "other/b.png", "photos.png"):
        raw.put_object(Bucket="inbox", Key=other, Body=b"y")
    raw.put_object(Bucket="inbox", Key="photos/folder/", Body=b"")  # a console "folder" placeholder

    found = list(objects.list("inbox", "photos/"))

    assert sorted(o.key for o in found) == keys
    assert found[0] == ObjectInfo("inbox", found[0].key, 3, found[0].etag)
    assert found[0].etag and '"' not in found[0].etag


def test_read_returns_bytes_and_info(raw, objects):
    raw.put_object(Bucket="inbox", Key="a b/ä.png", Body=b"image bytes")
    data, info = objects.read("inbox", "a b/ä.png", max_bytes=100)
    assert data == b"image bytes"
    assert (info.bucket, info.key, info.size) == ("inbox", "a b/ä.png", 11)
    assert info.etag == raw.head_object(Bucket="inbox", Key="a b/ä.png")["ETag"].strip('"')


def test_read_of_an_empty_object_gives_empty_bytes(raw, objects):
    raw.put_object(Bucket="inbox", Key="empty.png", Body=b"")
    data, info = objects.read("inbox", "empty.png", max_bytes=100)
    assert data == b"" and info.size == 0


def test_read_refuses_a_big_object_without_downloading_it(moto_endpoint, raw):
    raw.put_object(Bucket="inbox", Key="big.png", Body=b"\0" * MIB)
    s3 = s3_client(moto_endpoint)
    bodies = []
    # keep the response stream to count what was taken from it
    s3.meta.events.register("after-call.s3.GetObject", lambda parsed, **_: bodies.append(parsed.get("Body")))
    start = time.monotonic()
    with pytest.raises(InputRejected) as err:
        S3Objects(s3).read("inbox", "big.png", max_bytes=1000)
    assert time.monotonic() - start < 2
    assert (err.value.code, err.value.stage) == ("too_many_bytes", "read")
    assert str(MIB) in err.value.message
    assert bodies and bodies[0]._amount_read == 0  # not a byte of the body was read


def test_read_of_a_missing_object_is_vanished(raw, objects):
    with pytest.raises(InputRejected) as err:
        objects.read("inbox", "gone.png", max_bytes=100)
    assert (err.value.code, err.value.stage) == ("vanished", "read")
    assert err.value.message == "the object disappeared before it could be read"


def test_head(raw, objects):
    raw.put_object(Bucket="inbox", Key="k", Body=b"12345", Metadata={"model": "x2"})
    assert objects.head("inbox", "k") == {"model": "x2", "ContentLength": 5,
                                        "ETag": raw.head_object(Bucket="inbox", Key="k")["ETag"].strip('"')}
    assert objects.head("inbox", "missing") is None


def test_publish_small_is_one_put_with_type_and_metadata(raw, objects):
    meta = {"source-bucket": "inbox", "source-key": "fotos/Ünïcödé 写真.png",
            "source-sha256": "ab" * 32, "model": "edsr-x2"}
    objects.publish("inbox", "out/a.png", b"png bytes", content_type="image/png", metadata=meta)

    head = raw.head_object(Bucket="inbox", Key="out/a.png")
    assert head["ContentType"] == "image/png"
    assert "-" not in head["ETag"]  # a single PUT, not a multipart upload
    assert head["Metadata"]["source-key"].isascii()
    assert {k: unquote(v) for k, v in head["Metadata"].items()} == meta
    assert raw.get_object(Bucket="inbox", Key="out/a.png")["Body"].read() == b"png bytes"
    assert objects.head("inbox", "out/a.png") == {**meta, "ContentLength": 9, "ETag": head["ETag"].strip('"')}


def test_publish_large_is_a_completed_multipart_upload(moto_endpoint, raw):
    objects = S3Objects(s3_client(moto_endpoint), multipart_threshold=5 * MIB)
    body = bytes(range(256)) * (12 * MIB // 256)
    objects.publish("inbox", "out/big.png", body, content_type="image/png", metadata={"model": "m"})

    head = raw.head_object(Bucket="inbox", Key="out/big.png")
    assert head["ETag"].strip('"').endswith("-2")  # 8 MiB + 4 MiB parts
    assert (head["ContentType"], head["Metadata"]) == ("image/png", {"model": "m"})
    assert raw.get_object(Bucket="inbox", Key="out/big.png")["Body"].read() == body
    assert "Uploads" not in raw.list_multipart_uploads(Bucket="inbox")


@pytest.mark.parametrize("size", [10, 6 * MIB])
def test_publish_into_a_missing_bucket_is_transient(moto_endpoint, raw, size):
    objects = S3Objects(s3_client(moto_endpoint, max_attempts=1), multipart_threshold=5 * MIB)
    with pytest.raises(TransientError) as err:
        objects.publish("nobucket", "a.png", b"x" * size, content_type="image/png", metadata={})
    assert err.value.stage == "publish"
    assert "NoSuchBucket" in err.value.message
    assert objects.head("nobucket", "a.png") is None


def test_write_failure_keeps_the_input_next_to_its_record(raw, objects):
    raw.create_bucket(Bucket="failed")
    raw.put_object(Bucket="inbox", Key="x/bad.png", Body=b"not a png", Metadata={"owner": "me"})

    objects.write_failure({"code": "not_an_image", "stage": "decode"}, "inbox", "x/bad.png", "failed", "x/bad.png")

    record = raw.get_object(Bucket="failed", Key="x/bad.png.error.json")
    assert record["ContentType"] == "application/json"
    assert json.loads(record["Body"].read()) == {"code": "not_an_image", "stage": "decode"}
    kept = raw.get_object(Bucket="failed", Key="x/bad.png")
    assert (kept["Body"].read(), kept["Metadata"]) == (b"not a png", {"owner": "me"})
    assert raw.get_object(Bucket="inbox", Key="x/bad.png")["Body"].read() == b"not a png"  # copied, not moved


def test_write_failure_without_the_input_writes_only_the_record(raw, objects):
    raw.create_bucket(Bucket="failed")

    objects.write_failure({"code": "vanished"}, "inbox", "gone.png", "failed", "gone.png")

    record = json.loads(raw.get_object(Bucket="failed", Key="gone.png.error.json")["Body"].read())
    assert record["input_kept"] is False and "no longer exists" in record["note"]
    assert [o["Key"] for o in raw.list_objects_v2(Bucket="failed")["Contents"]] == ["gone.png.error.json"]


def test_a_dead_endpoint_is_transient(moto_endpoint):
    dead = f"http://127.0.0.1:{free_port()}"  # bound then closed: nothing listens there
    objects = S3Objects(s3_client(dead, max_attempts=2, connect_timeout=1, read_timeout=1))
    start = time.monotonic()
    with pytest.raises(TransientError) as err:
        objects.read("inbox", "a.png", max_bytes=100)
    assert err.value.stage == "read"
    with pytest.raises(TransientError) as err:
        objects.publish("inbox", "a.png", b"x", content_type="image/png", metadata={})
    assert err.value.stage == "publish"
    assert time.monotonic() - start < 10


def test_a_missing_bucket(moto_endpoint, objects):
    with pytest.raises(ConfigError) as err:
        list(objects.list("nobucket", ""))
    assert err.value.code == "no_bucket"
    with pytest.raises(InputRejected) as err:
        objects.read("nobucket", "a.png", max_bytes=10)
    assert err.value.code == "vanished"
    assert objects.head("nobucket", "a.png") is None
