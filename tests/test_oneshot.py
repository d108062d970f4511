"""`superres upscale` on files, folders and globs: relative trees, no overwrites, dedup, restarts."""

import shutil

import cv2
import numpy as np

from conftest import DATASETS, SHARED_MODELS
from handler.cli import main

MODEL = ["--model", "fsrcnn-small-x3", "--model-dir", str(SHARED_MODELS)]


def visible_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".superres" not in p.parts)


def test_folder_tree_kept_and_same_stem_never_overwrites(tmp_path, small_images):
    scans = tmp_path / "scans"
    (scans / "box 1").mkdir(parents=True)
    shutil.copy(small_images[0], scans / "a.jpg")
    shutil.copy(small_images[1], scans / "a.png")
    shutil.copy(small_images[3], scans / "box 1" / "c.png")
    (scans / "box 1" / "ignored.part").write_bytes(b"still downloading")
    out = tmp_path / "out"
    assert main(["upscale", str(scans), "--out", str(out), *MODEL]) == 0
    assert visible_files(out) == ["a.jpg", "a.png", "box 1/c.png"]
    assert cv2.imread(str(out / "a.png")).shape[:2] == tuple(3 * s for s in cv2.imread(str(scans / "a.png")).shape[:2])


def test_globs_and_files_and_a_forced_format(tmp_path, small_images):
    out = tmp_path / "out"
    pattern = str(small_images[0].parent / "img0[0-3].*")
    assert main(["upscale", pattern, str(small_images[5]), "--out", str(out), "--format", "png", *MODEL]) == 0
    assert visible_files(out) == ["img00.jpg.png", "img01.png", "img02.jpg.png", "img03.png", "img05.png"]


def test_same_bytes_under_another_name_or_again_are_not_upscaled_again(tmp_path, small_images, capsys):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(small_images[3], src / "first.png")
    shutil.copy(small_images[3], src / "second.png")
    out = tmp_path / "out"
    assert main(["upscale", str(src), "--out", str(out), *MODEL]) == 0
    assert "done 1, duplicate 1" in capsys.readouterr().out
    assert (out / "first.png").read_bytes() == (out / "second.png").read_bytes()  # the duplicate got a copy
    # a second run (a restart) does nothing again
    assert main(["upscale", str(src), "--out", str(out), *MODEL]) == 0
    assert "done 0, duplicate 0, failed 0, already done 2" in capsys.readouterr().out
    # the same bytes dropped under a third name, in a later run
    shutil.copy(small_images[3], src / "third.png")
    assert main(["upscale", str(src / "third.png"), "--out", str(out), "--on-duplicate", "record", *MODEL]) == 0
    assert "duplicate 1" in capsys.readouterr().out
    assert not (out / "third.png").exists()
    import sqlite3

    runs = sqlite3.connect(out / ".superres" / "ledger.sqlite3").execute("SELECT SUM(engine_runs) FROM items").fetchone()
    assert runs == (1,)


def test_another_model_is_another_item(tmp_path, small_images, capsys):
    out = tmp_path / "out"
    assert main(["upscale", str(small_images[1]), "--out", str(out), *MODEL]) == 0
    assert main(["upscale", str(small_images[1]), "--out", str(tmp_path / "out2"), "--ledger",
                 str(out / ".superres" / "ledger.sqlite3"), "--model", "espcn-x3", "--model-dir", str(SHARED_MODELS)]) == 0
    assert capsys.readouterr().out.count("done 1") == 2


def test_cap_policy_shrinks_first_like_the_seed(tmp_path):
    big = cv2.imread(str(DATASETS / "Set14" / "HR" / "comic.png"))
    cv2.imwrite(str(tmp_path / "big.png"), big)
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "big.png"), "--out", str(out), "--policy", "cap", "--cap-side", "100", *MODEL]) == 0
    h, w = cv2.imread(str(out / "big.png")).shape[:2]
    assert max(h, w) == 300
    assert main(["upscale", str(tmp_path / "big.png"), "--out", str(tmp_path / "full"), *MODEL]) == 0
    assert cv2.imread(str(tmp_path / "full" / "big.png")).shape[:2] == (big.shape[0] * 3, big.shape[1] * 3)


def test_progress_lines_and_summary_when_not_a_terminal(tmp_path, small_images, capsys):
    assert main(["upscale", *map(str, small_images[:3]), "--out", str(tmp_path / "o"), *MODEL]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("done ") >= 3
    assert "output Mpx/s" in captured.out
    assert np.all([cv2.imread(str(tmp_path / "o" / p.name)) is not None for p in small_images[:3]])


# -- inputs never harmed, outputs never taken back in ------------------------------------------------------------


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_equal_to_an_input_folder_is_refused_and_the_inputs_stay_as_they_were(tmp_path, small_images, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in small_images[:3]:
        shutil.copy(path, photos / path.name)
    before = snapshot(photos)
    name = small_images[0].name
    for argv in ([str(photos)], [str(photos / "."), str(photos / name)], [str(photos / name)], [str(photos / "*")]):
        assert main(["upscale", *argv, "--out", str(photos), *MODEL]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("superres: error:"), err
        assert "where this run writes" in err
        assert snapshot(photos) == before
    # the way out the message suggests
    assert main(["upscale", str(photos), "--out", str(photos / "upscaled"), *MODEL]) == 0
    assert visible_files(photos / "upscaled") == sorted(p.name for p in small_images[:3])


def test_out_inside_the_input_folder_three_times_takes_no_output_back_in(tmp_path, small_images, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in small_images[:2]:
        shutil.copy(path, photos / path.name)
    (photos / "broken.png").write_bytes(b"<html>not an image</html>")
    args = ["upscale", str(photos), "--out", str(photos / "up"), *MODEL]  # failed/ defaults to photos/up.failed

    assert main(args) == 1
    assert "done 2, duplicate 0, failed 1" in capsys.readouterr().out
    first = snapshot(photos)
    assert visible_files(photos / "up") == sorted(p.name for p in small_images[:2])
    assert visible_files(photos / "up.failed") == ["broken.png", "broken.png.error.json"]
    for _ in range(2):
        assert main(args) == 1  # broken.png failed before and is unchanged: still failed
        assert "done 0, duplicate 0, failed 0, already done 2, still failed 1" in capsys.readouterr().out
        assert not (photos / "up" / "up").exists() and not (photos / "up.failed" / "up.failed").exists()
        assert not (photos / "up" / "up.failed").exists() and not (photos / "up.failed" / "up").exists()
        assert {k: v for k, v in snapshot(photos).items() if ".superres" not in k} == \
            {k: v for k, v in first.items() if ".superres" not in k}


def test_a_run_without_failures_leaves_no_failed_folder(tmp_path, small_images):
    assert main(["upscale", str(small_images[1]), "--out", str(tmp_path / "out"), *MODEL]) == 0
    assert (tmp_path / "out" / small_images[1].name).exists()
    assert not (tmp_path / "out.failed").exists() and not (tmp_path / "failed").exists()


def test_a_small_run_is_weighed_from_its_headers_and_any_other_is_not(tmp_path):
    from handler.oneshot import SMALL_RUN_BYTES, SMALL_RUN_FILES, small_run_pixels
    from pipeline.adapters.local_files import LocalFile

    def files(*shapes):
        out = []
        for i, (h, w) in enumerate(shapes):
            path = tmp_path / f"f{len(list(tmp_path.iterdir()))}-{i}.png"
            cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))
            out.append(LocalFile(path, path.name))
        return out

    assert small_run_pixels(files((64, 64), (30, 50))) == 64 * 64 + 30 * 50
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    link = tmp_path / "link.png"
    link.symlink_to(files((40, 40))[0].path)  # the reader never follows it: no pixels either
    assert small_run_pixels(files((10, 10)) + [LocalFile(broken, "b.png"), LocalFile(link, "l.png")]) == 100
    assert small_run_pixels(files(*[(8, 8)] * (SMALL_RUN_FILES + 1))) is None
    noise = tmp_path / "noise.png"  # incompressible: the file alone is over the bytes weighed
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8))
    assert noise.stat().st_size > SMALL_RUN_BYTES and small_run_pixels([LocalFile(noise, "n.png")]) is None
    assert small_run_pixels([object()]) is None  # an S3 object: its size is not weighed
