"""Set-up errors as a first-time user meets them, in real processes: each is one line on stderr, exit 2, no
traceback, said before any input is read, and nothing is left behind (no outbox, failed place, ledger, bucket
object)."""

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd
from moto_server import AWS_ENV, aws_env, client, keys

IMAGE = DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"
MODEL = ["--model", "fsrcnn-small-x2"]


def run(*args, timeout=120, **env):
    return subprocess.run([*superres_cmd(), *map(str, args)], env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def one_line_exit_2(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files)


@pytest.fixture
def inbox(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bird.png").write_bytes(IMAGE.read_bytes())
    return folder


# -- local places ---------------------------------------------------------------------------------------------

def test_an_outbox_that_is_a_file(tmp_path, inbox):
    (tmp_path / "out").write_text("not a folder")
    before = tree(tmp_path)
    line = one_line_exit_2(run("upscale", inbox, "--out", tmp_path / "out", *MODEL), "outbox", "is a file")
    assert str(tmp_path / "out") in line
    assert tree(tmp_path) == before


def test_a_failed_place_that_is_a_file(tmp_path, inbox):
    (tmp_path / "failed").write_text("not a folder")
    before = tree(tmp_path)
    one_line_exit_2(run("upscale", inbox, "--out", tmp_path / "out", "--failed", tmp_path / "failed", *MODEL),
                    "failed place", "is a file")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag", ["--out", "--failed", "--ledger"])
def test_a_place_that_cannot_be_made_under_a_file(tmp_path, inbox, flag):
    # a path under a regular file: refused for root too (permissions would not be)
    (tmp_path / "file").write_text("x")
    where = tmp_path / "file" / "sub" / ("ledger.sqlite3" if flag == "--ledger" else "place")
    args = {"--out": tmp_path / "out", flag: where}
    before = tree(tmp_path)
    line = one_line_exit_2(run("upscale", inbox, *[x for kv in args.items() for x in kv], *MODEL),
                           "cannot be made", "is a file")
    assert str(tmp_path / "file") in line
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: the case under a file covers root")
def test_an_outbox_in_a_folder_without_write_permission(tmp_path, inbox):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_exit_2(run("upscale", inbox, "--out", locked / "out", *MODEL), "permission denied")
        assert tree(locked) == []
    finally:
        locked.chmod(0o755)


def test_the_default_failed_place_is_the_outboxs_own(tmp_path, inbox):
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    result = run("upscale", inbox, "--out", tmp_path / "a", *MODEL)
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "a.failed" / "broken.png.error.json").exists()
    assert not (tmp_path / "failed").exists()
    # a second outbox in the same folder has a failed place of its own; one with no failure makes none
    (inbox / "broken.png").unlink()
    assert run("upscale", inbox, "--out", tmp_path / "b", *MODEL).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["a", "a.failed", "b", "in"]


# -- S3 -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["outbox", "failed", "ledger"])
def test_an_s3_place_whose_bucket_is_missing(tmp_path, inbox, moto_endpoint, which):
    s3 = client("s3", moto_endpoint)
    s3.create_bucket(Bucket="real")
    places = {"outbox": "s3://real/done/", "failed": "s3://real/failed/", "ledger": "s3://real/.ledger/"}
    places[which] = "s3://nosuch/x/"
    result = run("upscale", inbox, "--out", places["outbox"], "--failed", places["failed"], "--ledger",
                 places["ledger"], *MODEL, **aws_env(moto_endpoint))
    one_line_exit_2(result, "'nosuch'", "does not exist")
    assert keys(s3, "real") == set()
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["real"]


def test_an_s3_input_whose_bucket_is_missing(tmp_path, moto_endpoint):
    result = run("upscale", "s3://nosuch/in/", "--out", tmp_path / "out", *MODEL, **aws_env(moto_endpoint))
    one_line_exit_2(result, "'nosuch'", "does not exist")
    assert tree(tmp_path) == []


def test_s3_without_credentials(tmp_path, inbox, moto_endpoint):
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_")}
    env.update(AWS_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               SUPERRES_S3_ENDPOINT_URL=moto_endpoint)
    result = subprocess.run([*superres_cmd(), "upscale", str(inbox), "--out", "s3://real/done/", *MODEL],
                            env=env, capture_output=True, text=True, timeout=120)
    one_line_exit_2(result, "credentials")
    assert tree(tmp_path) == ["in", "in/bird.png"]


def test_an_s3_endpoint_that_does_not_answer_is_said_at_once(tmp_path, inbox):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = run("upscale", inbox, "--out", "s3://real/done/", *MODEL, **AWS_ENV,
                 SUPERRES_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    seconds = time.monotonic() - started
    one_line_exit_2(result, "does not answer", f"127.0.0.1:{port}")
    assert seconds < 30, seconds  # a few seconds of start-up and two tries, not a retry per input
    assert "retry" not in result.stdout
    assert tree(tmp_path) == ["in", "in/bird.png"]


# -- models and settings --------------------------------------------------------------------------------------

def test_a_missing_model_says_which_pull_to_run(tmp_path, inbox):
    result = run("upscale", inbox, "--out", tmp_path / "out", "--model", "espcn-x3",
                 SUPERRES_MODEL_DIR=str(tmp_path / "empty"))
    one_line_exit_2(result, "superres models pull espcn-x3")
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("args, words", [
    (["--model", "fsrcnn-x3", "--scale", "2"], ["fsrcnn-x3 upscales x3, not x2", "fsrcnn-x2"]),
    (["--model", "lapsrn", "--scale", "3"], ["lapsrn has no x3"]),
    (["--model", "fsrcnn"], ["is a family", "--scale"]),
    (["--model", "nosuch-x9"], ["unknown model"]),
    (["--suffix", "a/b"], ["suffix"]),
    (["--quality", "0"], ["quality"]),
    (["--lease-s", "1"], ["lease_s"]),
])
def test_bad_setting_combinations(tmp_path, inbox, args, words):
    one_line_exit_2(run("upscale", inbox, "--out", tmp_path / "out", *args), *words)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_overwrite_is_refused_for_watch(tmp_path, inbox):
    one_line_exit_2(run("watch", "--inbox", inbox, "--outbox", tmp_path / "out", "--overwrite", *MODEL),
                    "--overwrite", "superres upscale")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_an_output_file_name_with_several_inputs(tmp_path, inbox):
    (inbox / "two.png").write_bytes(IMAGE.read_bytes())
    one_line_exit_2(run("upscale", inbox / "bird.png", inbox / "two.png", "--out", tmp_path / "big.png", *MODEL),
                    "names an output file", "2 inputs")
    one_line_exit_2(run("upscale", inbox, "--out", tmp_path / "big.png", *MODEL), "a folder or a glob")
    one_line_exit_2(run("upscale", inbox / "bird.png", "--out", tmp_path / "big.png", "--format", "webp", *MODEL),
                    "PNG file name", "webp")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_all_inputs_missing_is_exit_2(tmp_path):
    one_line_exit_2(run("upscale", tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / "out", *MODEL),
                    "none of the inputs exist")
    assert os.listdir(tmp_path) == []


# -- info and models verify without models ----------------------------------------------------------------------

def test_info_without_the_model(tmp_path):
    result = run("info", "--model", "espcn-x2", "--engine", "opencv", SUPERRES_MODEL_DIR=str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["engine"], doc["device"], doc["model"], doc["model_status"]) == ("opencv", "cpu", "espcn-x2",
                                                                                "missing")
    assert doc["to_get_it"] == "superres models pull espcn-x2"
    assert "superres models pull espcn-x2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "none").exists()


def test_models_verify_on_an_empty_cache(tmp_path):
    """Nothing pulled: our bundled models are still there (and checked), so that is no error."""
    from models.catalog import CATALOG

    result = run("models", "verify", "--model-dir", tmp_path)
    assert result.returncode == 0, result.stdout
    bundled = sorted(name for name, spec in CATALOG.items() if spec.bundled)
    assert result.stdout.splitlines()[0].startswith(f"checked {len(bundled)} model file(s) in {tmp_path}")
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert {name for name, state in rows.items() if state == "ok"} == set(bundled)
    assert result.stderr == ""


def test_models_verify_says_ok_bad_and_missing(tmp_path):
    from models.catalog import CATALOG

    (tmp_path / "FSRCNN_x2.pb").write_bytes((SHARED_MODELS / "FSRCNN_x2.pb").read_bytes())
    (tmp_path / "ESPCN_x2.pb").write_bytes(b"truncated")
    result = run("models", "verify", "--model-dir", tmp_path)
    assert result.returncode == 1, result.stdout
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["fsrcnn-x2"].split()[1] == "ok"
    assert rows["espcn-x2"].split()[1] == "bad" and "models pull espcn-x2 --force" in rows["espcn-x2"]
    assert rows["lapsrn-x8"].split()[1] == "missing"
    bundled = sum(spec.bundled for spec in CATALOG.values())  # ours, always there
    assert result.stdout.splitlines()[0].startswith(f"checked {2 + bundled} model file(s)")


@pytest.mark.parametrize("args, words", [
    (["--engine", "opencv", "--lanes", "2"], ["--lanes 2", "opencv", "one item at a time"]),
    (["--engine", "onnxruntime", "--lanes", "2", "--tile-batch", "4"], ["--lanes 2", "grouped calls"]),
    (["--engine", "onnxruntime", "--lanes", "17"], ["lanes", "at most 16"]),
])
def test_lanes_an_engine_cannot_run(tmp_path, inbox, args, words):
    before = tree(tmp_path)
    one_line_exit_2(run("upscale", inbox, "--out", tmp_path / "out", *MODEL, *args), *words)
    assert tree(tmp_path) == before  # refused before the outbox, the failed place or the ledger exist
