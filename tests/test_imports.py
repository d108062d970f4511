"""What a real `superres` process imports: nothing heavy it does not use (torch ~1 s, boto3 ~0.1 s, onnx ~0.5 s,
watchdog, prometheus_client, http.server). Each case runs the CLI in a fresh interpreter and reads sys.modules at
the end of the run."""

import json
import subprocess
import sys

import cv2
import pytest

from conftest import DATASETS, cli_env

HEAVY = ("torch", "boto3", "botocore", "watchdog", "prometheus_client", "http.server", "onnx", "onnxruntime", "tqdm")
_PROBE = ("import json, sys\nfrom handler.cli import main\nrc = main(sys.argv[1:])\n"
          "print('MODULES=' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy} "
          "or m in {heavy})))\nsys.exit(rc)")


def imported(args: list[str], env: dict) -> set[str]:
    code = _PROBE.format(heavy=repr(set(HEAVY)))
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("MODULES="))
    return {m for m in json.loads(line.removeprefix("MODULES=")) if m in HEAVY}


@pytest.fixture
def one_image(tmp_path):
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"))[:32, :32])
    return path


@pytest.fixture
def env(tmp_path):
    return cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"), SUPERRES_MODEL="fsrcnn-x2")


def test_upscale_with_opencv_imports_no_other_engine_nor_aws_nor_metrics(tmp_path, one_image, env):
    assert imported(["upscale", str(one_image), "--out", str(tmp_path / "out"), "--engine", "opencv",
                     "--model", "fsrcnn-x2", "-q"], env) == set()


def test_upscale_with_onnxruntime_imports_onnx_only_to_convert(tmp_path, one_image, env):
    args = ["upscale", str(one_image), "--engine", "onnxruntime", "--model", "fsrcnn-x2", "-q"]
    assert imported(args + ["--out", str(tmp_path / "a")], env) == {"onnxruntime", "onnx"}  # first use converts
    assert imported(args + ["--out", str(tmp_path / "b")], env) == {"onnxruntime"}  # then the cache is read


def test_default_upscale_imports_only_the_engine_auto_picks(tmp_path, one_image, env):
    # auto on a CPU: one small image is over before onnxruntime has loaded (OpenCV's engine, no onnxruntime);
    # a run over models.engines.base.SMALL_RUN_GMAC takes onnxruntime, the fastest end to end; never torch, AWS,
    # watchdog or metrics
    others = {"torch", "boto3", "botocore", "watchdog", "prometheus_client", "http.server", "tqdm"}
    found = imported(["upscale", str(one_image), "--out", str(tmp_path / "a"), "--model", "fsrcnn-x2", "-q"], env)
    assert not found & ({"onnxruntime"} | others)
    big = tmp_path / "big.png"  # 640x640 at 8,152 MACs a pixel: 3.3 GMAC
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(one_image)), (640, 640), interpolation=cv2.INTER_CUBIC))
    found = imported(["upscale", str(big), "--out", str(tmp_path / "b"), "--model", "fsrcnn-x2", "-q"], env)
    assert "onnxruntime" in found and not found & others


def test_models_list_and_export_import_no_engine_runtime(tmp_path, env):
    assert imported(["models", "list"], env) == set()
    assert imported(["models", "export", "espcn-x2", "--onnx", str(tmp_path / "e.onnx")], env) == {"onnx"}


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("4", "4")])
def test_openblas_threads_are_one_unless_the_user_says(given, expected):
    # the pipeline does no BLAS: OpenBLAS's idle threads only spin at start (~0.13 s of CPU); set before numpy loads
    env = {k: v for k, v in cli_env().items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    probe = "import os, sys, handler; print(os.environ['OPENBLAS_NUM_THREADS'], 'numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [expected, "False"], done.stderr
