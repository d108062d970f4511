"""What users of Real-ESRGAN, waifu2x and upscayl type, in real processes: --format jpg/tif, --quality, --suffix,
--overwrite, --version, -q/-v, --scale, image files only in walks and globs, a missing path among several, and
--out NAME.png for one input."""

import os
import subprocess
from importlib.metadata import version

import cv2
import pytest
from PIL import Image

from conftest import DATASETS, cli_env, superres_cmd
from handler.cli import build_parser, settings_from_args
from handler.oneshot import NOT_AN_IMAGE, expand_inputs
from pipeline.process import output_rel

IMAGE = DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"
MODEL = ["--model", "fsrcnn-small-x2"]


def run(*args, **env):
    return subprocess.run([*superres_cmd(), *map(str, args)], env=cli_env(**env), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "photo.png").write_bytes(IMAGE.read_bytes())
    cv2.imwrite(str(folder / "shot.JPG"), cv2.imread(str(IMAGE)))
    return folder


def side(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# -- formats and quality ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ext, pillow", [("jpg", ".jpg", "JPEG"), ("tif", ".tif", "TIFF"),
                                               ("JPG", ".jpg", "JPEG")])
def test_format_aliases(tmp_path, photos, name, ext, pillow):
    result = run("upscale", photos / "photo.png", "--out", tmp_path / "out", "--format", name, *MODEL)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / f"photo.png{ext}") as im:
        assert im.format == pillow


def test_format_aliases_are_stored_canonical(tmp_path):
    # the same request whichever name: "already done" does not depend on the spelling
    settings = settings_from_args(build_parser().parse_args(["upscale", "x", "--format", "jpg", "--out", "o"]))
    assert settings.format == "jpeg"
    settings = settings_from_args(build_parser().parse_args(["upscale", "x", "--format", "tif", "--out", "o"]))
    assert settings.format == "tiff"


def test_quality_sets_both_unless_one_is_given():
    parse = lambda *a: settings_from_args(build_parser().parse_args(["upscale", "x", "--out", "o", *a]))  # noqa: E731
    s = parse("--quality", "40")
    assert (s.jpeg_quality, s.webp_quality) == (40, 40)
    s = parse("--quality", "40", "--webp-quality", "80")
    assert (s.jpeg_quality, s.webp_quality) == (40, 80)
    s = parse()
    assert (s.jpeg_quality, s.webp_quality) == (95, 95)


def test_quality_reaches_the_encoder(tmp_path, photos):
    for q in (30, 95):
        result = run("upscale", photos / "photo.png", "--out", tmp_path / f"q{q}", "--format", "jpg", "--quality", q,
                     *MODEL)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "q30" / "photo.png.jpg").stat().st_size < (tmp_path / "q95" / "photo.png.jpg").stat().st_size


# -- names ------------------------------------------------------------------------------------------------------

def test_output_rel_with_a_suffix():
    assert output_rel("photo.png", ".png", "_x3") == "photo_x3.png"
    assert output_rel("dir/a.jpeg", ".jpg", "_x3") == "dir/a_x3.jpeg"
    # a.jpg and a.png never share an output, suffix or not
    assert output_rel("a.jpg", ".png", "_x3") == "a_x3.jpg.png" != output_rel("a.png", ".png", "_x3") == "a_x3.png"
    assert output_rel("a.jpg", ".png") == "a.jpg.png"
    assert output_rel("noext", ".png", "-up") == "noext-up.png"


def test_suffix_and_scale(tmp_path, photos):
    result = run("upscale", photos, "--out", tmp_path / "out", "--model", "fsrcnn", "--scale", "3", "--suffix", "_x3")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [".superres", "photo_x3.png", "shot_x3.JPG"]
    w, h = side(IMAGE)
    assert side(tmp_path / "out" / "photo_x3.png") == (3 * w, 3 * h)  # fsrcnn-x3
    # the same run without the suffix is not "already done": another output name
    result = run("upscale", photos, "--out", tmp_path / "out", "--model", "fsrcnn-x3")
    assert result.returncode == 0, result.stderr
    assert {"photo.png", "photo_x3.png"} <= set(os.listdir(tmp_path / "out"))


def test_out_with_an_image_name_and_one_input_is_the_output_file(tmp_path, photos):
    result = run("upscale", photos / "shot.JPG", "--out", tmp_path / "big.png", *MODEL)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "big.png").is_file()  # a file, not a folder named big.png
    with Image.open(tmp_path / "big.png") as im:
        assert im.format == "PNG" and im.size == tuple(2 * s for s in side(IMAGE))
    assert sorted(os.listdir(tmp_path)) == [".superres", "big.png", "photos"]  # the ledger beside it, as for a folder
    # next to its input, in the input's folder: fine (its own outputs are never inputs, but this is no output)
    result = run("upscale", photos / "photo.png", "--out", photos / "photo-big.webp", *MODEL)
    assert result.returncode == 0, result.stderr
    with Image.open(photos / "photo-big.webp") as im:
        assert im.format == "WEBP"
    # an existing folder with such a name stays a folder
    (tmp_path / "dir.png").mkdir()
    assert run("upscale", photos / "photo.png", "--out", tmp_path / "dir.png", *MODEL).returncode == 0
    assert (tmp_path / "dir.png" / "photo.png").is_file()


# -- --overwrite --------------------------------------------------------------------------------------------------

def test_overwrite_processes_again_what_is_done(tmp_path, photos):
    out = tmp_path / "out"
    assert run("upscale", photos, "--out", out, *MODEL).returncode == 0
    first = (out / "photo.png").stat().st_ino
    again = run("upscale", photos, "--out", out, *MODEL)
    assert "already done 2" in again.stdout, again.stdout
    assert (out / "photo.png").stat().st_ino == first
    forced = run("upscale", photos, "--out", out, "--overwrite", *MODEL)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("done 2,") and "already done 0" in forced.stdout, forced.stdout
    assert (out / "photo.png").stat().st_ino != first  # published again, by an atomic rename
    assert sorted(os.listdir(out)) == [".superres", "photo.png", "shot.JPG"]
    assert os.listdir(out / ".superres" / "tmp") == []
    # and after it, settled again
    assert "already done 2" in run("upscale", photos, "--out", out, *MODEL).stdout


# -- --version, -q, -v --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["upscale"], ["watch"], ["worker"], ["serve"], ["enqueue"], ["models"],
                                     ["models", "verify"], ["models", "pull"], ["models", "export"], ["info"]])
def test_version_on_every_subcommand(command):
    result = run(*command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"superres {version('superres')}"


@pytest.mark.parametrize("flag, level", [("-q", "WARNING"), ("--quiet", "WARNING"), ("-v", "DEBUG"),
                                         ("--verbose", "DEBUG"), (None, "INFO")])
@pytest.mark.parametrize("command", [["upscale", "x", "--out", "o"], ["watch"], ["worker"], ["serve"],
                                     ["enqueue", "s3://b/p/", "--queue", "q"], ["info"], ["models", "list"]])
def test_quiet_and_verbose_set_the_log_level(command, flag, level):
    args = [*command, flag] if flag else command
    assert settings_from_args(build_parser().parse_args(args)).log_level == level


def test_quiet_and_verbose_together_are_refused():
    result = run("upscale", "x", "--out", "o", "-q", "-v")
    assert result.returncode == 2 and "not allowed with" in result.stderr


# -- what walks and globs take -------------------------------------------------------------------------------------

def test_non_images_in_a_folder_are_skipped_not_failed(tmp_path, photos):
    (photos / "notes.txt").write_text("shot on a sunny day")
    (photos / "sub").mkdir()
    (photos / "sub" / "readme.md").write_text("# photos")
    found = expand_inputs([str(photos)])
    assert sorted(s.rel for s in found) == ["photo.png", "shot.JPG"]  # any case
    assert sorted(found.skipped) == [str(photos / "notes.txt"), str(photos / "sub" / "readme.md")]
    assert NOT_AN_IMAGE == "not an image file (by extension)"
    globbed = expand_inputs([str(photos / "*")])
    assert sorted(s.rel for s in globbed) == ["photo.png", "shot.JPG"] and globbed.skipped == [str(photos / "notes.txt")]

    result = run("upscale", photos, "--out", tmp_path / "out", *MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed 0" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["out", "photos"]  # no out.failed/
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_a_file_named_explicitly_is_tried_whatever_its_name(tmp_path, photos):
    (photos / "photo.data").write_bytes(IMAGE.read_bytes())
    (photos / "notes.txt").write_text("not an image")
    found = expand_inputs([str(photos / "photo.data"), str(photos / "notes.txt")])
    assert [s.rel for s in found] == ["photo.data", "notes.txt"] and found.skipped == []
    result = run("upscale", photos / "photo.data", photos / "notes.txt", "--out", tmp_path / "out", *MODEL)
    assert result.returncode == 1
    assert (tmp_path / "out" / "photo.data.png").is_file()
    assert (tmp_path / "out.failed" / "notes.txt.error.json").is_file()


def test_a_missing_path_among_several(tmp_path, photos):
    found = expand_inputs([str(photos / "photo.png"), str(tmp_path / "nope.png"), str(tmp_path / "none*.png")])
    assert [s.rel for s in found] == ["photo.png"]
    assert found.missing == [str(tmp_path / "nope.png"), str(tmp_path / "none*.png")]
    result = run("upscale", photos / "photo.png", tmp_path / "nope.png", "--out", tmp_path / "out", *MODEL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (tmp_path / "out" / "photo.png").is_file()
    errors = [line for line in result.stderr.splitlines() if line.startswith("superres: error")]
    assert errors == [f"superres: error: no such file or folder: {tmp_path / 'nope.png'}"]
    assert "Traceback" not in result.stderr
