"""The command line as a user meets it: exit codes, one-line errors, settings from flags or SUPERRES_*."""

import argparse
import importlib.util
import json
import subprocess

import cv2
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd
from handler.cli import main


def run(*args, **env):
    return subprocess.run([*superres_cmd(), *args], env=cli_env(**env), capture_output=True, text=True, timeout=120)


def test_info_reports_engine_device_model_and_settings():
    result = run("info", "--model", "espcn-x4")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    # auto on a CPU, no known workload (info, like watch or a worker): ESPCN's measured fastest engine,
    # onnxruntime (a dependency, so always installed)
    expected = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "opencv"
    assert (doc["engine"], doc["device"], doc["model"], doc["scale"]) == (expected, "cpu", "espcn-x4", 4)
    assert doc["settings"]["model_dir"] == str(SHARED_MODELS)


def test_info_with_the_torch_engine_on_the_cpu():
    result = run("info", "--model", "fsrcnn-x2", "--engine", "torch")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["engine"], doc["device"], doc["precision"]) == ("torch", "cpu", "fp32")


def test_cuda_on_a_cpu_only_opencv_is_a_clear_start_up_error():
    result = run("info", "--model", "espcn-x2", "--device", "cuda")
    assert result.returncode == 2
    assert "no CUDA support" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["info", "--model", "nosuch-x9"], {}, "unknown model"),
        # `info` works without the model (tests/test_setup_errors.py); a run needs it
        (["upscale", str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"), "--out", "/tmp/never-made"],
         {"SUPERRES_MODEL": "espcn-x2", "SUPERRES_MODEL_DIR": "/nonexistent"}, "superres models pull espcn-x2"),
        (["info", "--model", "espcn-x2"], {"SUPERRES_TILE": "-5"}, "tile"),
        (["upscale", "/no/such/file.png", "--out", "/tmp/x", "--model", "espcn-x2"], {}, "no such file"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(args, env, words):
    result = run(*args, **env)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr.lower() and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_settings_come_from_the_environment_too(tmp_path):
    image = DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"
    result = run("upscale", str(image), SUPERRES_OUTBOX=str(tmp_path / "o"), SUPERRES_MODEL="fsrcnn-small-x4",
                 SUPERRES_FORMAT="webp")
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(tmp_path / "o" / "birdx4.png.webp"))
    assert out.shape[:2] == tuple(4 * s for s in cv2.imread(str(image)).shape[:2])
    assert "done 1, duplicate 0, failed 0" in result.stdout


def test_models_list_marks_missing_weights():
    result = run("models", "list")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert len(lines) == 21  # 15 OpenCV models, our 6 bundled ones
    assert "ok" in lines["fsrcnn-x3"] and "missing" in lines["edsr-x3"] and "bundled" in lines["fast-x3"]


def test_models_verify_passes_on_the_shared_models():
    result = run("models", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 12 + 6  # the shared files and our bundled ones


def test_in_process_main_returns_the_exit_code(tmp_path):
    assert main(["upscale", str(tmp_path / "missing.png"), "--out", str(tmp_path), "--model", "espcn-x2"]) == 2


@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--lease-s", "1"]])
def test_a_refused_configuration_leaves_nothing_behind(tmp_path, extra):
    image = DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"
    result = run("upscale", str(image), "--out", str(tmp_path / "out"), "--model", "espcn-x2", "--engine", "opencv",
                 *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # no outbox, no .superres/ledger.sqlite3, no failed/


def test_a_reader_that_leaves_early_is_no_error():
    """`superres models list | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.Popen([*superres_cmd(), "models", "list", "--model-dir", str(SHARED_MODELS)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [
    ["upscale", "a.png", "b/", "--out", "o", "--model", "fsrcnn-x3", "--engine", "opencv", "-q", "--png-compression", "6"],
    ["watch", "--inbox", "in", "--outbox", "out", "--disposition", "move", "--poll"],
    ["worker", "--queue", "https://q", "--outbox", "s3://b/o/", "--max-messages", "3"],
    ["serve", "--port", "0", "--out", "o", "--queue-max", "4"],
    ["enqueue", "s3://b/in/", "--queue", "https://q"],
    ["models", "export", "espcn-x2", "--onnx", "e.onnx", "--fp16"],
    ["info", "--engine", "onnxruntime", "-v"],
])
def test_a_run_builds_only_its_command_and_parses_the_same(argv):
    from handler.cli import COMMANDS, build_parser

    only = build_parser(argv[0])
    assert only.parse_args(argv) == build_parser().parse_args(argv)
    subcommands = next(a for a in only._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subcommands.choices) == [argv[0]] and argv[0] in COMMANDS
