"""Event parsing on the real sample documents (read in place from ../shared/events), on variants built from
them in memory, and on what moto in server mode really sends through S3 -> SQS."""

import copy
import json
import time
from pathlib import Path

import pytest
from moto_server import client

from pipeline.events import (
    LOOP_GUARD,
    UNRECOGNISED,
    Message,
    ObjectRef,
    Skipped,
    drop_loops,
    parse_eventbridge,
    parse_lambda_event,
    parse_s3_notification,
    parse_sqs_body,
)

EVENTS = Path(__file__).resolve().parents[2] / "shared" / "events"


def load(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


def s3_doc_with_key(key: str) -> dict:
    """s3Event.json with its object key replaced (as S3 would have encoded it)."""
    doc = copy.deepcopy(load("s3Event.json"))
    doc["Records"][0]["s3"]["object"]["key"] = key
    return doc


def sqs_event(*bodies: str) -> dict:
    """sqsEvent.json's first record, once per body, with distinct message ids."""
    template = load("sqsEvent.json")["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record["messageId"], record["body"] = f"m{i}", body
        records.append(record)
    return {"Records": records}


# ---- every real document, through the Lambda entry point ------------------------------------------------

BUCKET = "lambda-artifacts-deafc19498e3f2df"
HEX = "b21b84d653bb07b05b1e6b33684dc11b"

REAL = [
    ("s3Event.json", [Message(None, [ObjectRef(BUCKET, HEX, 1305107, HEX, "0C0F6F405D6ED209E1")], [])]),
    (
        "s3EventDecodedKey.json",
        [Message(None, [ObjectRef("sourcebucket", "Happy Face.jpg", 1024, "d41d8cd98f00b204e9800998ecf8427e",
                                  "Happy Sequencer", "version")], [])],
    ),
    ("s3EventDeleteObject.json", [Message(None, [], [Skipped("ObjectRemoved:Delete")])]),
    ("s3EventGlacier.json", [Message(None, [ObjectRef(BUCKET, HEX, 1305107, HEX, "0C0F6F405D6ED209E1")], [])]),
    (
        "s3SqsEvent.json",
        [Message("ca3e7a89-c358-40e5-8aa0-5da01403c267",
                 [ObjectRef("xxx", "test.pdf", 104681, "2e3ad1e983318bbd8e73b080e2997980", "00643717F9F8B85354",
                            "yd3d4HaWOT2zguDLvIQLU6ptDTwKBnQV")], [])],
    ),
    (
        "s3EventBridgeNotificationObjectCreatedEvent.json",
        [Message(None, [ObjectRef("example-bucket", "IMG_m7fzo3.jpg", 184662, "4e68adba0abe2dc8653dc3354e14c01d",
                                  "006408CAD69598B05E")], [])],
    ),
    ("s3EventBridgeNotificationObjectDeletedEvent.json", [Message(None, [], [Skipped("Object Deleted")])]),
    ("s3EventBridgeNotificationObjectExpiredEvent.json", [Message(None, [], [Skipped("Object Deleted")])]),
    (
        "s3EventBridgeNotificationObjectRestoreCompletedEvent.json",
        [Message(None, [], [Skipped("unknown event Object Restore Completed")])],
    ),
    ("snsEvent.json", [Message(None, [], [Skipped(UNRECOGNISED)])]),
]


@pytest.mark.parametrize(("name", "expected"), REAL, ids=[name for name, _ in REAL])
def test_real_documents(name, expected):
    assert parse_lambda_event(load(name)) == expected


NOT_S3 = [
    ("sqsEvent.json", ["059f36b4-87a3-44ab-83d2-661975830a7d", "2e1424d4-f796-459a-8184-9c92662be6da"]),
    ("snsSqsEvent.json", ["79406a00-bf15-46ca-978c-22c3613fcb30"]),
    ("snsSqsFifoEvent.json", ["69bc4bbd-ed69-4325-a434-85c3b428ceab"]),
]


@pytest.mark.parametrize(("name", "ids"), NOT_S3, ids=[name for name, _ in NOT_S3])
def test_sqs_bodies_that_are_not_s3_are_skipped_with_their_message_ids(name, ids):
    messages = parse_lambda_event(load(name))
    assert [m.message_id for m in messages] == ids
    for m in messages:
        assert m.objects == []
        assert len(m.skipped) == 1 and m.skipped[0].reason.startswith("not an S3 notification")


def test_decoded_key_ignores_the_samples_helper_field():
    # s3EventDecodedKey.json carries a non-AWS "urlDecodedKey"; the real field "key" is what is decoded.
    objects, _ = parse_s3_notification(load("s3EventDecodedKey.json"))
    assert objects[0].key == "Happy Face.jpg"


def test_eventbridge_keys_are_not_decoded():
    doc = copy.deepcopy(load("s3EventBridgeNotificationObjectCreatedEvent.json"))
    doc["detail"]["object"]["key"] = "in/a+b%2B c.jpg"
    doc["detail"]["object"]["version-id"] = "v1"
    (ref,), skipped = parse_eventbridge(doc)
    assert (ref.key, ref.version_id, skipped) == ("in/a+b%2B c.jpg", "v1", [])


# ---- variants built from the real documents --------------------------------------------------------------

KEYS = [
    ("in%2Fa+photo%2B1.png", "in/a photo+1.png"),  # moto: "/" encoded too
    ("in/a+photo%2B1.png", "in/a photo+1.png"),  # real S3: "/" left as is
    ("fot%C3%B3.jpg", "fotó.jpg"),  # non-ASCII: UTF-8 percent-encoded
    ("Happy%20Face.jpg", "Happy Face.jpg"),
    ("100%25+sure.png", "100% sure.png"),
]


@pytest.mark.parametrize(("encoded", "key"), KEYS)
def test_s3_keys_are_decoded_form_style(encoded, key):
    objects, skipped = parse_s3_notification(s3_doc_with_key(encoded))
    assert [o.key for o in objects] == [key] and skipped == []


def test_quoted_etag_loses_its_quotes():
    doc = load("s3Event.json")
    doc["Records"][0]["s3"]["object"]["eTag"] = f'"{HEX}"'
    assert parse_s3_notification(doc)[0][0].etag == HEX


def sns_envelope(message: dict) -> dict:
    envelope = json.loads(load("snsSqsEvent.json")["Records"][0]["body"])
    envelope["Message"] = json.dumps(message)
    return envelope


TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-01-01T00:00:00.000Z",
              "Bucket": "photos", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3e"}


def three_records() -> dict:
    doc = load("s3Event.json")
    first = doc["Records"][0]
    created2, removed = copy.deepcopy(first), copy.deepcopy(first)
    created2["s3"]["object"]["key"] = "b%2B2.png"
    removed["eventName"] = "ObjectRemoved:DeleteMarkerCreated"
    doc["Records"] = [first, created2, removed]
    return doc


BODIES = [
    ("test-event", json.dumps(TEST_EVENT), [], ["s3:TestEvent"]),
    ("three-records", json.dumps(three_records()), [HEX, "b+2.png"], ["ObjectRemoved:DeleteMarkerCreated"]),
    ("sns-around-s3", json.dumps(sns_envelope(s3_doc_with_key("in/fot%C3%B3.jpg"))), ["in/fotó.jpg"], []),
    ("sns-around-test-event", json.dumps(sns_envelope(TEST_EVENT)), [], ["s3:TestEvent"]),
    ("eventbridge-via-sqs", json.dumps(load("s3EventBridgeNotificationObjectCreatedEvent.json")),
     ["IMG_m7fzo3.jpg"], []),
    ("restore-record", json.dumps({"Records": [{**load("s3Event.json")["Records"][0],
                                                "eventName": "ObjectRestore:Completed"}]}),
     [], ["unknown event ObjectRestore:Completed"]),
    ("plain-text", "Test message.", [], ["not an S3 notification: body is not JSON"]),
    ("empty", "", [], ["not an S3 notification: body is not JSON"]),
    ("json-list", "[1, 2]", [], ["not an S3 notification: JSON list"]),
    ("json-null", "null", [], ["not an S3 notification: JSON NoneType"]),
    ("empty-records", '{"Records": []}', [], ["not an S3 notification: no Records"]),
    ("record-not-object", '{"Records": [42]}', [], ["not an S3 notification: a record is not an object"]),
    ("created-without-key", json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                                     "s3": {"bucket": {"name": "b"}}}]}),
     [], ["malformed S3 record: ObjectCreated:Put without s3.bucket.name or s3.object.key"]),
    ("sns-text-message", json.dumps({"Type": "Notification", "Message": "Hello from SNS!"}),
     [], ["not an S3 notification: SNS message is not JSON"]),
]


@pytest.mark.parametrize(("body", "keys", "reasons"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_sqs_bodies(body, keys, reasons):
    objects, skipped = parse_sqs_body(body)
    assert [o.key for o in objects] == keys
    assert [s.reason for s in skipped] == reasons


def test_sqs_batch_keeps_one_message_per_record():
    messages = parse_lambda_event(sqs_event(json.dumps(TEST_EVENT), json.dumps(three_records()), "junk"))
    assert [m.message_id for m in messages] == ["m0", "m1", "m2"]
    assert [(len(m.objects), len(m.skipped)) for m in messages] == [(0, 1), (2, 1), (0, 1)]


@pytest.mark.parametrize("event", [{}, {"Records": []}, {"foo": 1}, [], None, {"Records": [{"eventSource": "x"}]}])
def test_unknown_lambda_events(event):
    assert parse_lambda_event(event) == [Message(None, [], [Skipped(UNRECOGNISED)])]


# ---- loop guard -------------------------------------------------------------------------------------------

def ref(bucket: str, key: str) -> ObjectRef:
    return ObjectRef(bucket, key)


LOOPS = [
    # (object, excluded, kept?)
    (ref("photos", "out/a.jpg"), [("photos", "out/")], False),
    (ref("photos", "out/sub/a.jpg"), [("photos", "out")], False),  # prefix without "/" is the same folder
    (ref("photos", "outlier.jpg"), [("photos", "out")], True),  # ... and not a string prefix
    (ref("photos", "in/a.jpg"), [("photos", "out/")], True),
    (ref("other", "out/a.jpg"), [("photos", "out/")], True),  # same prefix, other bucket
    (ref("results", "a.jpg"), [("results", "")], False),  # the whole bucket
    (ref("photos", "failed/a.jpg"), [("photos", "out/"), ("photos", "failed/")], False),
    (ref("photos", "a.jpg"), [], True),
]


@pytest.mark.parametrize(("obj", "excluded", "kept"), LOOPS)
def test_drop_loops(obj, excluded, kept):
    assert drop_loops([obj], excluded) == (([obj], []) if kept else ([], [Skipped(LOOP_GUARD)]))


def test_drop_loops_on_a_parsed_event_with_the_outbox_in_the_same_bucket():
    doc = three_records()
    doc["Records"][1]["s3"]["object"]["key"] = "out%2Fx.png"
    objects, _ = parse_s3_notification(doc)
    kept, skipped = drop_loops(objects, [(BUCKET, "out/")])
    assert [o.key for o in kept] == [HEX]
    assert skipped == [Skipped("in the outbox prefix (loop guard)")]


# ---- what moto in server mode really sends: S3 -> SQS ------------------------------------------------------

def test_s3_to_sqs_notifications_from_moto(moto_endpoint):
    s3, sqs = client("s3", moto_endpoint), client("sqs", moto_endpoint)
    s3.create_bucket(Bucket="photos")
    queue = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket="photos",
        NotificationConfiguration={"QueueConfigurations": [{
            "QueueArn": arn,
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "in/"}]}},
        }]},
    )
    s3.put_object(Bucket="photos", Key="out/not-in-the-filter.png", Body=b"x")
    body = b"not really a png"
    s3.put_object(Bucket="photos", Key="in/a photo+1.png", Body=body)

    etag = s3.head_object(Bucket="photos", Key="in/a photo+1.png")["ETag"].strip('"')

    bodies: list[str] = []
    deadline = time.monotonic() + 10
    while len(bodies) < 2 and time.monotonic() < deadline:
        reply = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies += [m["Body"] for m in reply.get("Messages", [])]

    assert [parse_sqs_body(b) for b in bodies] == [
        ([], [Skipped("s3:TestEvent")]),
        ([ObjectRef("photos", "in/a photo+1.png", size=len(body), etag=etag)], []),
    ]
    # moto encodes "/" as "%2F" where real S3 leaves it: unquote_plus reads both the same
    assert "in%2Fa+photo%2B1.png" in bodies[1]
