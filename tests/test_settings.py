"""pipeline.settings: the table (names, defaults, limits, choices as they were under pydantic), the sources and
their precedence (defaults < .env < environment < flags), coercion of strings, and one ConfigError for every
problem at once."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, superres_cmd
from pipeline.errors import ConfigError
from pipeline.settings import Settings, load_settings, parse_dotenv

# What pydantic's Settings had (written out, not read from the table under test)
DEFAULTS = {
    "inbox": None, "outbox": None, "failed": None, "processed": None, "ledger": None, "s3_endpoint_url": None,
    "queue_url": None, "batch_size": 1, "visibility_s": 300, "wait_s": 20, "in_flight": 0, "model": "",
    "scale": None, "model_dir": None, "model_base_url": None, "engine": "auto", "device": "auto",
    "precision": "auto", "threads": 0, "lanes": 0, "policy": "tile", "tile": 0, "tile_batch": 0, "cap_side": 500,
    "max_bytes": 209715200, "max_pixels": 50000000, "max_side": 30000, "min_side": 1,
    "max_output_pixels": 300000000, "format": "keep", "jpeg_quality": 95, "webp_quality": 95,
    "png_compression": "fast", "quality": None, "suffix": "", "overwrite": False, "dedup": True,
    "on_duplicate": "copy", "disposition": "keep", "lease_s": 600.0, "heartbeat_s": 0.0, "poll": False,
    "settle_s": 1.0, "rescan_s": 30.0, "metrics_port": 9100, "metrics_host": "127.0.0.1", "host": "127.0.0.1",
    "port": 8080, "api_token": None, "cors_origins": "", "queue_max": 16, "result_ttl_s": 3600.0,
    "log_format": "text", "log_level": "INFO",
}
CHOICES = {
    "engine": ("auto", "opencv", "onnxruntime", "torch"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "fp16", "bf16"),
    "policy": ("tile", "cap"),
    "format": ("keep", "png", "jpeg", "webp", "tiff"),
    "png_compression": ("fast", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
    "on_duplicate": ("copy", "record"),
    "disposition": ("keep", "move", "delete"),
    "log_format": ("text", "json"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
# (lowest allowed, highest allowed or None) for the integer fields with bounds
INT_LIMITS = {
    "batch_size": (1, 10), "visibility_s": (10, 43200), "wait_s": (0, 20), "in_flight": (0, 256),
    "scale": (1, None), "threads": (0, None), "lanes": (0, 16), "tile": (0, None), "tile_batch": (0, None), "cap_side": (1, None),
    "max_bytes": (1, None), "max_pixels": (1, None), "max_side": (1, None), "min_side": (1, None),
    "max_output_pixels": (1, None), "jpeg_quality": (1, 100), "webp_quality": (1, 100), "quality": (1, 100),
    "metrics_port": (0, 65535), "port": (0, 65535), "queue_max": (1, None),
}
POSITIVE_FLOATS = ("lease_s", "rescan_s", "result_ttl_s")  # > 0
NON_NEGATIVE_FLOATS = ("heartbeat_s", "settle_s")  # >= 0


@pytest.fixture(autouse=True)
def _in_an_empty_folder(tmp_path, monkeypatch):
    """No `.env` but the ones a test writes (load_settings reads the current directory's)."""
    monkeypatch.chdir(tmp_path)


def problems_of(values: dict) -> str:
    with pytest.raises(ConfigError) as refused:
        Settings.from_values(values)
    return refused.value.message


# ------------------------------------------------------------------------------------------ the table --------

def test_names_and_defaults_are_as_they_were():
    assert Settings.field_names() == tuple(DEFAULTS)
    assert dataclasses.asdict(Settings()) == DEFAULTS


@pytest.mark.parametrize("name", [*CHOICES, "batch_size", "model"])
def test_choices_are_as_they_were(name):
    assert Settings.choices(name) == CHOICES.get(name, ())
    for choice in CHOICES.get(name, ()):
        assert getattr(Settings.from_values({name: choice}), name) == choice


@pytest.mark.parametrize("name", INT_LIMITS)
def test_integer_limits_are_as_they_were(name):
    low, high = INT_LIMITS[name]
    assert getattr(Settings.from_values({name: low}), name) == low
    assert problems_of({name: low - 1}) == f"invalid settings: {name}: must be at least {low} (got {low - 1})"
    if high is not None:
        assert getattr(Settings.from_values({name: str(high)}), name) == high
        assert problems_of({name: high + 1}) == f"invalid settings: {name}: must be at most {high} (got {high + 1})"


@pytest.mark.parametrize("name", POSITIVE_FLOATS + NON_NEGATIVE_FLOATS)
def test_float_limits_are_as_they_were(name):
    assert getattr(Settings.from_values({name: "0.001"}), name) == 0.001
    if name in POSITIVE_FLOATS:
        assert problems_of({name: "0"}) == f"invalid settings: {name}: must be greater than 0 (got 0.0)"
    else:
        assert getattr(Settings.from_values({name: 0}), name) == 0.0
        assert problems_of({name: -1}) == f"invalid settings: {name}: must be at least 0 (got -1.0)"


def test_the_json_view_has_every_setting_and_paths_as_strings():
    doc = Settings.from_values({"model_dir": "/models", "lease_s": "5"}).as_json_dict()
    assert list(doc) == list(DEFAULTS) and json.loads(json.dumps(doc)) == doc
    assert doc["model_dir"] == "/models" and doc["lease_s"] == 5.0


def test_replace_checks_again():
    settings = Settings.from_values({"model": "fsrcnn-x3", "quality": 80})
    changed = dataclasses.replace(settings, format="jpg")
    assert (changed.format, changed.model, changed.jpeg_quality) == ("jpeg", "fsrcnn-x3", 80)
    with pytest.raises(ConfigError, match="batch_size: must be at most 10"):
        dataclasses.replace(settings, batch_size=11)


def test_an_unknown_name_in_code_is_a_type_error():
    with pytest.raises(TypeError):
        load_settings(batch_sise=2)


# ------------------------------------------------------------------------------------------ coercion ---------

@pytest.mark.parametrize("name, given, expected", [
    ("batch_size", "7", 7), ("batch_size", " 7 ", 7), ("batch_size", 7, 7), ("batch_size", 7.0, 7),
    ("batch_size", "7.0", 7), ("threads", "+3", 3),
    ("lease_s", "0.5", 0.5), ("lease_s", "3", 3.0), ("lease_s", 3, 3.0), ("lease_s", "inf", float("inf")),
    ("model_dir", "/m", Path("/m")), ("model_dir", Path("/m"), Path("/m")),
    ("scale", "", None), ("inbox", "", None), ("model_dir", "", None), ("api_token", "", None),
    ("scale", None, None), ("suffix", "", ""), ("cors_origins", "", ""), ("model", "", ""),
    ("inbox", "s3://b/in/", "s3://b/in/"),
])
def test_values_are_coerced_to_the_fields_type(name, given, expected):
    value = getattr(Settings.from_values({name: given}), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("word, expected", [
    *[(w, True) for w in ("1", "true", "True", "TRUE", "yes", "Yes", "on", "ON", "t", "T", "y", "Y", " yes ")],
    *[(w, False) for w in ("0", "false", "False", "no", "NO", "off", "Off", "f", "F", "n", "N")],
    (True, True), (False, False), (1, True), (0, False),
])
def test_booleans(word, expected):
    assert Settings.from_values({"poll": word}).poll is expected


@pytest.mark.parametrize("values, message", [
    ({"batch_size": "1.5"}, "batch_size: must be an integer (got '1.5')"),
    ({"batch_size": "abc"}, "batch_size: must be an integer (got 'abc')"),
    ({"batch_size": ""}, "batch_size: must be an integer (got '')"),
    ({"batch_size": True}, "batch_size: must be an integer (got True)"),
    ({"scale": "x3"}, "scale: must be an integer (got 'x3')"),
    ({"lease_s": "abc"}, "lease_s: must be a number (got 'abc')"),
    ({"lease_s": "nan"}, "lease_s: must be a number (got 'nan')"),
    ({"poll": "maybe"}, "poll: must be true or false (1/0, yes/no, on/off) (got 'maybe')"),
    ({"dedup": 2}, "dedup: must be true or false (1/0, yes/no, on/off) (got 2)"),
    ({"inbox": 5}, "inbox: must be a string (got 5)"),
    ({"model_dir": 5}, "model_dir: must be a path (got 5)"),
    ({"engine": "cuda"}, "engine: must be one of auto, opencv, onnxruntime, torch (got 'cuda')"),
    ({"engine": "OPENCV"}, "engine: must be one of auto, opencv, onnxruntime, torch (got 'OPENCV')"),
    ({"log_level": "info"}, "log_level: must be one of DEBUG, INFO, WARNING, ERROR (got 'info')"),
    ({"format": "bmp"}, "format: must be one of keep, png, jpeg, webp, tiff (got 'bmp')"),
    ({"png_compression": 11}, "png_compression: must be one of fast, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (got '11')"),
    ({"png_compression": 1.5}, "png_compression: must be a string (got 1.5)"),
    # every problem, in the table's order, in one message
    ({"engine": "cuda", "batch_size": "11"},
     "batch_size: must be at most 10 (got 11); engine: must be one of auto, opencv, onnxruntime, torch (got 'cuda')"),
])
def test_a_bad_value_is_named_with_what_is_wanted_and_what_was_given(values, message):
    assert problems_of(values) == f"invalid settings: {message}"


@pytest.mark.parametrize("suffix", ["a/b", "/", "a\\b", "a\0b", ".", ".."])
def test_a_suffix_is_part_of_a_file_name(suffix):
    assert problems_of({"suffix": suffix}) == (
        f"invalid settings: suffix: a suffix is part of a file name: no '/', '\\' or NUL (got {suffix!r})")


@pytest.mark.parametrize("suffix", ["_x3", "...", ".x", "-big"])
def test_plain_suffixes_pass(suffix):
    assert Settings.from_values({"suffix": suffix}).suffix == suffix


# ------------------------------------------------------------------------------------------ clean-ups --------

@pytest.mark.parametrize("name, given, expected", [
    ("model", " FSRCNN-X3 ", "fsrcnn-x3"), ("model", "Edsr", "edsr"),
    ("format", "jpg", "jpeg"), ("format", " JPG ", "jpeg"), ("format", "Tif", "tiff"), ("format", "JPEG", "jpeg"),
    ("format", "png", "png"), ("format", "KEEP", "keep"),
    ("png_compression", 6, "6"), ("png_compression", 0, "0"), ("png_compression", " 9 ", "9"),
    ("png_compression", "FAST", "fast"),
])
def test_names_are_stored_canonical(name, given, expected):
    assert getattr(Settings.from_values({name: given}), name) == expected


@pytest.mark.parametrize("values, jpeg, webp", [
    ({}, 95, 95),
    ({"quality": 80}, 80, 80),
    ({"quality": "80", "jpeg_quality": 90}, 90, 80),
    ({"quality": 80, "webp_quality": "70"}, 80, 70),
    ({"quality": 80, "jpeg_quality": 95, "webp_quality": 95}, 95, 95),  # given, even at the default
    ({"jpeg_quality": 60}, 60, 95),
])
def test_quality_sets_both_unless_one_is_given(values, jpeg, webp):
    settings = Settings.from_values(values)
    assert (settings.jpeg_quality, settings.webp_quality) == (jpeg, webp)


def test_a_bad_quality_is_said_once():
    assert problems_of({"quality": 0}) == "invalid settings: quality: must be at least 1 (got 0)"


# ------------------------------------------------------------------------------------------ sources ----------

@pytest.mark.parametrize("dotenv, env, flags, expected", [
    ("", {}, {}, 1),
    ("SUPERRES_BATCH_SIZE=3\n", {}, {}, 3),
    ("SUPERRES_BATCH_SIZE=3\n", {"SUPERRES_BATCH_SIZE": "4"}, {}, 4),
    ("SUPERRES_BATCH_SIZE=3\n", {"SUPERRES_BATCH_SIZE": "4"}, {"batch_size": 5}, 5),
    ("SUPERRES_BATCH_SIZE=3\n", {"SUPERRES_BATCH_SIZE": "4"}, {"batch_size": None}, 4),  # None: not given
    ("SUPERRES_BATCH_SIZE=3\n", {}, {"batch_size": None}, 3),
    ("", {"superres_batch_size": "6"}, {}, 6),  # the name in any case
    ("superres_Batch_Size=7\n", {}, {}, 7),
    ("BATCH_SIZE=8\n", {"BATCH_SIZE": "8"}, {}, 1),  # not ours without the prefix
])
def test_sources_in_order_of_precedence(tmp_path, monkeypatch, dotenv, env, flags, expected):
    (tmp_path / ".env").write_text(dotenv)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings(model="fsrcnn-x3", **flags).batch_size == expected


def test_the_quality_rule_counts_every_source_as_given(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("SUPERRES_WEBP_QUALITY=70\n")
    monkeypatch.setenv("SUPERRES_QUALITY", "85")
    settings = load_settings(model="fsrcnn-x3")
    assert (settings.quality, settings.jpeg_quality, settings.webp_quality) == (85, 85, 70)
    settings = load_settings(model="fsrcnn-x3", quality=50, jpeg_quality=None)
    assert (settings.jpeg_quality, settings.webp_quality) == (50, 70)


def test_unknown_superres_variables_are_ignored(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("SUPERRES_NO_SUCH=1\nOTHER=2\n")
    monkeypatch.setenv("SUPERRES_ALSO_NOT_A_SETTING", "x")
    monkeypatch.setenv("SUPERRES_", "x")
    assert load_settings(model="fsrcnn-x3").batch_size == 1


def test_a_dotenv_folder_is_no_file(tmp_path):
    (tmp_path / ".env").mkdir()
    assert load_settings(model="fsrcnn-x3").batch_size == 1


def test_an_unreadable_dotenv_is_a_set_up_error(tmp_path):
    (tmp_path / ".env").write_bytes(b"SUPERRES_SUFFIX=\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"cannot read .*\.env"):
        load_settings(model="fsrcnn-x3")


@pytest.mark.parametrize("line, expected", [
    ("SUPERRES_HOST=0.0.0.0", {"SUPERRES_HOST": "0.0.0.0"}),
    ("  SUPERRES_HOST = 0.0.0.0  ", {"SUPERRES_HOST": "0.0.0.0"}),
    ("export SUPERRES_HOST=0.0.0.0", {"SUPERRES_HOST": "0.0.0.0"}),
    ("SUPERRES_SUFFIX='_x3'", {"SUPERRES_SUFFIX": "_x3"}),
    ('SUPERRES_SUFFIX="_x3"', {"SUPERRES_SUFFIX": "_x3"}),
    ("SUPERRES_API_TOKEN='a # b'", {"SUPERRES_API_TOKEN": "a # b"}),
    ('SUPERRES_API_TOKEN="a # b" # the token', {"SUPERRES_API_TOKEN": "a # b"}),
    ('SUPERRES_API_TOKEN="say \\"hi\\""', {"SUPERRES_API_TOKEN": 'say "hi"'}),
    ("SUPERRES_API_TOKEN='a\\nb'", {"SUPERRES_API_TOKEN": "a\\nb"}),  # single quotes: as written
    ("SUPERRES_CORS_ORIGINS=a,b # who may call", {"SUPERRES_CORS_ORIGINS": "a,b"}),
    ("SUPERRES_API_TOKEN=a#b", {"SUPERRES_API_TOKEN": "a#b"}),
    ("SUPERRES_INBOX=", {"SUPERRES_INBOX": ""}),
    ("SUPERRES_INBOX=a=b", {"SUPERRES_INBOX": "a=b"}),
    ("# SUPERRES_HOST=0.0.0.0", {}),
    ("#SUPERRES_HOST=0.0.0.0", {}),
    ("", {}),
    ("SUPERRES_HOST", {}),
])
def test_dotenv_lines(line, expected):
    assert parse_dotenv(f"{line}\n") == expected


def test_a_dotenv_file_as_people_write_them(tmp_path):
    (tmp_path / ".env").write_text(
        "# superres on this machine\n\n"
        "export SUPERRES_OUTBOX='/srv/out'\n"
        'SUPERRES_FORMAT="JPG"  # smaller files\n'
        "SUPERRES_POLL=yes\n"
        "SUPERRES_SCALE=\n"
        "SUPERRES_MODEL = FSRCNN\n"
        "SUPERRES_SCALE=2\n")  # the later line wins
    settings = load_settings()
    assert (settings.outbox, settings.format, settings.poll, settings.model) == ("/srv/out", "jpeg", True, "fsrcnn-x2")


# ------------------------------------------------------------------------------------------ real processes ---

def test_bad_values_from_dotenv_and_environment_are_one_line_and_exit_2(tmp_path):
    (tmp_path / ".env").write_text("SUPERRES_BATCH_SIZE=99\n")
    image = tmp_path / "x.png"
    image.write_bytes(b"")  # never read: the settings are refused first
    result = subprocess.run([*superres_cmd(), "upscale", str(image), "--out", str(tmp_path / "o") + "/"],
                            cwd=tmp_path, env=cli_env(SUPERRES_ENGINE="cuda"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("superres: error: invalid settings: batch_size: must be at most 10 (got 99); "
                             "engine: must be one of auto, opencv, onnxruntime, torch (got 'cuda')\n")
    assert not (tmp_path / "o").exists()


def test_the_command_line_imports_no_pydantic():
    code = ("import sys, handler.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_settings', 'dotenv'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
