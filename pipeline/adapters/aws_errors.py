"""What an S3 or SQS call's error means, decided here once for every adapter: `classify(exc)` names its class,
`call(what, fn, ...)` runs a call, retries the transient ones a few times and raises `AwsFailure` (with the class)
for the rest. Callers decide what a class means for *their* object: a missing source is an input's failure, a
missing ledger bucket is a set-up error.

botocore already retries a request that failed with throttling, a 5xx or a broken connection; what it does not
retry is a response whose body was cut off after the headers came (a streamed GET body, or the small body of a
non-streaming answer, which comes up as urllib3's ProtocolError). `call` retries the whole call for those too.
"""

import http.client
import random
import time

import urllib3.exceptions
from boto3.exceptions import Boto3Error
from botocore.exceptions import (BotoCoreError, ClientError, CredentialRetrievalError, InvalidDNSNameError,
                                 NoCredentialsError, ParamValidationError, PartialCredentialsError,
                                 UnsupportedS3AccesspointConfigurationError, UnsupportedS3ArnError)
from botocore.parsers import ResponseParserError
from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError

from pipeline.errors import SuperresError

# the classes
TRANSIENT = "transient"  # throttling, 5xx, timeouts, resets, cut-off answers: a later try may work
MISSING = "missing"  # no such key
NO_BUCKET = "no_bucket"  # the bucket does not exist
BAD_BUCKET = "bad_bucket"  # the name can never be a bucket (refused by botocore or S3)
DENIED = "denied"  # access denied to this object or bucket
ARCHIVED = "archived"  # Glacier: not readable without a restore
CONFLICT = "conflict"  # a conditional write or delete lost (412, 409)
NO_QUEUE = "no_queue"  # the SQS queue does not exist
CREDENTIALS = "credentials"  # our own credentials are missing, wrong or expired: never an object's fault
INVALID = "invalid"  # any other refusal of the request (4xx): a retry sends the same request again

_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
               "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
               "BandwidthLimitExceeded", "LimitExceededException", "ProvisionedThroughputExceededException",
               "PriorRequestNotComplete", "EC2ThrottledException", "TransactionInProgressException"}
# "try again", whatever the status says
_TRY_AGAIN = {"RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
              "OperationAborted", "IDPCommunicationError"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
                "InvalidToken", "InvalidClientTokenId", "UnrecognizedClientException", "TokenRefreshRequired"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_NO_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
# network-level failures from the layers under botocore (some reach us unwrapped: see the module's doc)
_NETWORK = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ResponseParserError)

TRIES = 3  # of `call`, each one a request that botocore may already have retried


def code(exc: BaseException) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def status(exc: BaseException) -> int:
    if not isinstance(exc, ClientError):
        return 0
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def classify(exc: BaseException) -> str | None:
    """The class of an error from an S3/SQS call, or None when it is not one (a bug of ours: let it show)."""
    if isinstance(exc, ClientError):
        name, http = code(exc), status(exc)
        if name in _THROTTLING or name in _TRY_AGAIN or http >= 500 or http == 429:
            return TRANSIENT
        if name in _CONFLICT or http in (409, 412):
            return CONFLICT
        if name in _MISSING:
            return MISSING
        if name == "NoSuchBucket":
            return NO_BUCKET
        if name == "InvalidBucketName":
            return BAD_BUCKET
        if name in _DENIED:
            return DENIED
        if name in _CREDENTIALS:
            return CREDENTIALS
        if name == "InvalidObjectState":
            return ARCHIVED
        if name in _NO_QUEUE:
            return NO_QUEUE
        return INVALID
    if isinstance(exc, ParamValidationError):  # refused before sending: nothing a retry changes
        return BAD_BUCKET if "bucket name" in str(exc).lower() else INVALID
    if isinstance(exc, (InvalidDNSNameError, UnsupportedS3ArnError, UnsupportedS3AccesspointConfigurationError)):
        return BAD_BUCKET
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return CREDENTIALS
    # the rest of botocore's and boto3's errors (connection, read timeout, cut-off stream, checksum, ...) and the
    # network layers' own: transient, never an input's fault
    if isinstance(exc, (BotoCoreError, Boto3Error, RetriesExceededError, S3UploadFailedError, *_NETWORK)):
        return TRANSIENT
    return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, AwsFailure):
        return str(exc)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


class AwsFailure(Exception):
    """An S3/SQS call that did not work (after the retries its class allows), with the class of its error."""

    def __init__(self, what: str, kind: str, cause: BaseException):
        super().__init__(f"{what} failed: {describe(cause)}")
        self.what, self.kind, self.cause = what, kind, cause


def call(what: str, fn, *args, tries: int = TRIES, **kwargs):
    """fn(*args, **kwargs); a transient error is retried (bounded, with jitter), then raised as AwsFailure like
    every other S3/SQS error. Our own errors (SuperresError) and bugs pass through untouched."""
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except SuperresError:
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            attempt += 1
            if kind != TRANSIENT or attempt >= tries:
                raise AwsFailure(what, kind, exc) from exc
        # full jitter, so workers that failed together do not come back together
        time.sleep(random.uniform(0.5, 1.0) * min(2.0, 0.2 * 2 ** attempt))
