"""S3 URIs and keys made safe: pure string functions, no boto3.

A prefix is treated as a folder: "in" and "in/" both mean the keys under "in/", so that
join_key(prefix, relative_key(key, prefix)) gives back a clean key, and "inbox/x.jpg" is never taken as
being "under" the prefix "in".
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.errors import ConfigError

_SCHEME = "s3://"
# S3's rules for new buckets: 3-63 of lower-case letters, digits, dots and hyphens, starting and ending
# with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3_uri(text: str) -> bool:
    """True when `text` is meant as an S3 location (it may still be invalid: parse_s3_uri says why)."""
    return text.startswith(_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix/" -> ("bucket", "some/prefix/"); "s3://bucket" -> ("bucket", "")."""
    if not is_s3_uri(uri):
        raise ConfigError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}")
    bucket, _, key = uri[len(_SCHEME):].partition("/")
    if not bucket:
        raise ConfigError(f"S3 URI has no bucket name: {uri!r}")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r} in {uri!r}: use 3-63 lower-case letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return bucket, key


def _folder(prefix: str) -> str:
    return prefix if prefix == "" or prefix.endswith("/") else prefix + "/"


def _safe_segment(segment: str) -> str:
    # Control characters (C0, DEL, C1) would break log lines, headers and local file names.
    return "".join("_" if unicodedata.category(ch) == "Cc" else ch for ch in segment)


def relative_key(key: str, prefix: str) -> str:
    """The part of `key` below `prefix`, safe as an output name under another prefix or as a local relative
    path: no leading "/", no "." / ".." or empty segments, control characters replaced by "_"; never empty.

    A key equal to the prefix itself (a single object named as the input) gives its last segment.
    A key not under the prefix raises ValueError.
    """
    if prefix and key == prefix:
        rest = key.rsplit("/", 1)[-1]  # "in/" (a console "folder" object) -> "" -> "_" below
    elif key.startswith(_folder(prefix)):
        rest = key[len(_folder(prefix)):]
    else:
        raise ValueError(f"key {key!r} is not under the prefix {prefix!r}")
    # ".." is dropped, not resolved: resolving could climb out of the prefix and gives nothing safer.
    segments = [_safe_segment(s) for s in rest.split("/") if s not in ("", ".", "..")]
    return "/".join(segments) or "_"


def join_key(prefix: str, rel: str) -> str:
    """`rel` under the folder `prefix` ("" is the bucket's top)."""
    return _folder(prefix) + rel
