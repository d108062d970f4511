"""S3Objects over real HTTP against moto's server: pagination, size limits, whole-object publishes, failure records;
how S3/SQS errors are classified (aws_errors) and what that makes of a source, an outbox or a failure record."""

import http.client
import importlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import boto3
import pytest
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                 FlexibleChecksumError, IncompleteReadError, NoCredentialsError, ParamValidationError,
                                 ReadTimeoutError, ResponseStreamingError)
from conftest import SHARED_MODELS
from moto_server import client, free_port

from pipeline.adapters import aws_errors
from pipeline.adapters.aws_errors import (ARCHIVED, BAD_BUCKET, CONFLICT, CREDENTIALS, DENIED, INVALID, MISSING,
                                          NO_BUCKET, NO_QUEUE, TRANSIENT, AwsFailure, call, classify)
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


# -- errors: classified once (aws_errors), mapped by what the object is to us ------------------------------------


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    """A ClientError as botocore builds it from an answer."""
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


CLASSIFIED = [
    # throttling and 5xx: retried
    (client_error("SlowDown", 503, "PutObject"), TRANSIENT),
    (client_error("Throttling", 400), TRANSIENT),
    (client_error("ThrottlingException", 400, "ReceiveMessage"), TRANSIENT),
    (client_error("RequestLimitExceeded", 400), TRANSIENT),
    (client_error("TooManyRequestsException", 429), TRANSIENT),
    (client_error("InternalError", 500), TRANSIENT),
    (client_error("ServiceUnavailable", 503), TRANSIENT),
    (client_error("500", 500, "HeadObject"), TRANSIENT),  # HEAD answers have no body: the code is the status
    (client_error("RequestTimeout", 400, "PutObject"), TRANSIENT),
    (client_error("OperationAborted", 409, "PutObject"), TRANSIENT),
    # connections, timeouts and cut-off answers, wrapped by botocore or not
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TRANSIENT),
    (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), TRANSIENT),
    (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), TRANSIENT),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:1", error="read timed out"), TRANSIENT),
    (ResponseStreamingError(error=urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")), TRANSIENT),
    (IncompleteReadError(actual_bytes=10, expected_bytes=20), TRANSIENT),
    (FlexibleChecksumError(error_msg="the body's CRC32 does not match"), TRANSIENT),
    (urllib3.exceptions.ProtocolError("Connection broken", http.client.IncompleteRead(b"", 64)), TRANSIENT),
    (urllib3.exceptions.IncompleteRead(10, 20), TRANSIENT),
    (urllib3.exceptions.ReadTimeoutError(None, "/k", "Read timed out."), TRANSIENT),
    (http.client.IncompleteRead(b"x", 5), TRANSIENT),
    (http.client.RemoteDisconnected("Remote end closed connection without response"), TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), TRANSIENT),
    (TimeoutError("timed out"), TRANSIENT),
    (S3UploadFailedError("Failed to upload a.png to b/a.png: ..."), TRANSIENT),
    # what S3 says of the object or its bucket
    (client_error("NoSuchKey", 404), MISSING),
    (client_error("404", 404, "HeadObject"), MISSING),
    (client_error("NoSuchBucket", 404), NO_BUCKET),
    (client_error("InvalidBucketName", 400), BAD_BUCKET),
    (ParamValidationError(report='Invalid bucket name "no such bucket!": Bucket name must match the regex ...'),
     BAD_BUCKET),
    (client_error("AccessDenied", 403), DENIED),
    (client_error("403", 403, "HeadObject"), DENIED),
    (client_error("InvalidObjectState", 403), ARCHIVED),
    (client_error("PreconditionFailed", 412, "PutObject"), CONFLICT),
    (client_error("ConditionalRequestConflict", 409, "PutObject"), CONFLICT),
    (client_error("AWS.SimpleQueueService.NonExistentQueue", 400, "GetQueueAttributes"), NO_QUEUE),
    # our own credentials: never an object's fault
    (client_error("InvalidAccessKeyId", 403), CREDENTIALS),
    (client_error("ExpiredToken", 400), CREDENTIALS),
    (NoCredentialsError(), CREDENTIALS),
    # a request no retry changes
    (client_error("InvalidArgument", 400), INVALID),
    (ParamValidationError(report="Missing required parameter in input: \"Key\""), INVALID),
    # not from S3 or SQS: a bug of ours, left to show as one
    (KeyError("Attributes"), None),
    (ValueError("bad"), None),
]


@pytest.mark.parametrize("exc, kind", CLASSIFIED, ids=[f"{type(e).__name__}-{aws_errors.code(e) or k}"
                                                      for e, k in CLASSIFIED])
def test_classify(exc, kind):
    assert classify(exc) == kind


def test_classify_errors_of_real_calls(moto_endpoint, raw):
    s3 = s3_client(moto_endpoint, max_attempts=1)
    raw.put_object(Bucket="inbox", Key="k", Body=b"x")

    def error_of(fn, **kwargs):
        with pytest.raises(Exception) as err:
            fn(**kwargs)
        return classify(err.value)

    assert error_of(s3.get_object, Bucket="inbox", Key="gone") == MISSING
    assert error_of(s3.head_object, Bucket="inbox", Key="gone") == MISSING
    assert error_of(s3.get_object, Bucket="nobucket", Key="k") == NO_BUCKET
    assert error_of(s3.get_object, Bucket="no such bucket!", Key="k") == BAD_BUCKET  # refused before sending
    assert error_of(s3.put_object, Bucket="inbox", Key="k", Body=b"y", IfNoneMatch="*") == CONFLICT
    dead = s3_client(f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=1)
    assert error_of(dead.get_object, Bucket="inbox", Key="k") == TRANSIENT


def test_call_retries_transient_errors_only_and_lets_ours_through():
    tries = []

    def flaky(fail_with, times):
        tries.append(1)
        if len(tries) <= times:
            raise fail_with
        return "ok"

    assert call("x", flaky, ConnectionResetError(104, "reset"), 2) == "ok" and len(tries) == 3
    tries.clear()
    with pytest.raises(AwsFailure) as err:
        call("reading s3://b/k", flaky, ConnectionResetError(104, "reset"), 5)
    assert len(tries) == aws_errors.TRIES and err.value.kind == TRANSIENT
    assert str(err.value) == "reading s3://b/k failed: ConnectionResetError: [Errno 104] reset"
    tries.clear()
    with pytest.raises(AwsFailure) as err:  # no retry can bring a key back
        call("x", flaky, client_error("NoSuchKey", 404), 5)
    assert len(tries) == 1 and err.value.kind == MISSING
    tries.clear()
    with pytest.raises(InputRejected):  # the pipeline's own errors and bugs pass through, untried again
        call("x", flaky, InputRejected("too big", code="too_many_bytes"), 5)
    with pytest.raises(KeyError):
        call("x", flaky, KeyError("Body"), 5)
    assert len(tries) == 2


def test_a_source_in_a_bucket_that_cannot_exist_is_unreadable_for_good(raw, objects):
    with pytest.raises(InputRejected) as err:
        objects.read("no such bucket!", "a.png", max_bytes=10)
    assert (err.value.code, err.value.stage) == ("unreadable", "read")
    assert "not a valid bucket name" in err.value.message
    assert objects.head("no such bucket!", "a.png") is None


def test_a_copy_of_a_missing_object_is_transient_not_an_input_failure(raw, objects):
    """What is copied is an output (for a duplicate) or an input already settled (move): its absence must not
    file the input in hand as failed."""
    with pytest.raises(TransientError) as err:
        objects.copy("inbox", "done/gone.png", "inbox", "done/copy.png")
    assert (err.value.code, err.value.stage) == ("missing", "publish")


def test_write_failure_for_an_input_that_cannot_be_read_writes_only_the_record(raw, objects):
    raw.create_bucket(Bucket="failed")
    objects.write_failure({"code": "unreadable"}, "no such bucket!", "a.png", "failed", "a.png")  # returns: no loop
    record = json.loads(raw.get_object(Bucket="failed", Key="a.png.error.json")["Body"].read())
    assert record["input_kept"] is False and "only this record remains" in record["note"]
    assert [o["Key"] for o in raw.list_objects_v2(Bucket="failed")["Contents"]] == ["a.png.error.json"]


class CountingBody:
    """A response body that notes how much each read asked for."""

    def __init__(self, body, asked: list):
        self._body, self._asked = body, asked

    def read(self, amt=None):
        self._asked.append(amt)
        return self._body.read(amt)

    def close(self):
        self._body.close()


def test_read_asks_for_what_the_object_holds_not_the_limit(moto_endpoint, raw):
    """A 2 KiB object under a 1 GiB limit: the body is asked for its length + 1 (to notice more), never for the
    limit, which a reader may allocate up front."""
    raw.put_object(Bucket="inbox", Key="small.png", Body=b"x" * 2048)
    s3, asked = s3_client(moto_endpoint), []

    def count(parsed, **_):
        parsed["Body"] = CountingBody(parsed["Body"], asked)
    s3.meta.events.register("after-call.s3.GetObject", count)
    data, info = S3Objects(s3).read("inbox", "small.png", max_bytes=1024 * MIB)
    assert data == b"x" * 2048 and info.size == 2048
    assert asked == [2049]


@pytest.fixture
def lam(moto_endpoint, raw, monkeypatch):
    """The Lambda handler module, loaded (with its engine) for an outbox and failed prefix in bucket "outbox"."""
    raw.create_bucket(Bucket="outbox")
    for key, value in {"SUPERRES_OUTBOX": "s3://outbox/done/", "SUPERRES_FAILED": "s3://outbox/failed/",
                       "SUPERRES_MODEL": "fsrcnn-small-x2", "SUPERRES_MODEL_DIR": str(SHARED_MODELS)}.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop("handler.lambda_function", None)
    yield importlib.import_module("handler.lambda_function")
    sys.modules.pop("handler.lambda_function", None)


@pytest.mark.parametrize("bucket, code", [("no such bucket!", "unreadable"), ("no-such-bucket", "vanished")])
def test_a_direct_event_naming_an_impossible_bucket_is_a_permanent_record(raw, lam, bucket, code):
    """Not a TransientError (Lambda would retry the event forever): the source is recorded as unreadable."""
    event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": bucket}, "object": {"key": "drop/a.png", "size": 10}}}]}
    assert lam.handler(event, None)["results"]["failed"] == 1
    found = [o["Key"] for o in raw.list_objects_v2(Bucket="outbox", Prefix="failed/").get("Contents", [])]
    assert found == ["failed/drop/a.png.error.json"]
    record = json.loads(raw.get_object(Bucket="outbox", Key=found[0])["Body"].read())
    assert (record["error"], record["stage"], record["input_kept"]) == (code, "read", False)
