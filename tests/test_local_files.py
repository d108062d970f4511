"""Local inputs and places on real files: reads that never follow a symlink nor leave the inbox, dispositions
that touch only the bytes read, failure records that never overwrite each other, names too long to be files."""

import json
import os
import threading

import pytest

from pipeline.adapters.local_files import LocalFile, LocalPlace
from pipeline.errors import InputRejected, TransientError

RECORD = {"stage": "decode", "error": "not_an_image", "message": "not an image", "input": "/in/x.png"}


def rejected(src, max_bytes=1000) -> InputRejected:
    with pytest.raises(InputRejected) as info:
        src.read(max_bytes)
    return info.value


@pytest.fixture
def inbox(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    (tmp_path / "secret.txt").write_bytes(b"the secret")
    return folder


# -- read --------------------------------------------------------------------------------------------------------


def test_read_gives_the_bytes_and_remembers_what_it_read(inbox):
    (inbox / "a.png").write_bytes(b"abc")
    src = LocalFile(inbox / "a.png", "a.png", inbox)
    data, fingerprint = src.read(1000)
    st = os.lstat(inbox / "a.png")
    assert data == b"abc" and fingerprint == f"3:{st.st_mtime_ns}" == src.fingerprint()
    assert src.read_as == (st.st_dev, st.st_ino, 3, st.st_mtime_ns)


def test_read_allocates_what_the_file_holds_not_the_limit(inbox):
    (inbox / "a.png").write_bytes(b"small")
    # 2**48 bytes is more than a process can map: allocating the limit up front would fail
    assert LocalFile(inbox / "a.png", "a.png", inbox).read(2**48)[0] == b"small"


@pytest.mark.parametrize("with_root", [True, False])
@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_symlink_is_refused_wherever_it_points(inbox, with_root, target):
    (inbox / "real.png").write_bytes(b"inside")
    os.symlink(inbox.parent / "secret.txt" if target == "outside" else inbox / "real.png", inbox / "link.png")
    src = LocalFile(inbox / "link.png", "link.png", inbox if with_root else None)
    error = rejected(src)
    assert error.code == "symlink" and "left where it is" in error.message
    assert src.read_as is None
    src.dispose("delete")
    assert (inbox / "link.png").is_symlink()


def test_a_symlinked_folder_on_the_way_does_not_lead_outside(inbox, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(b"the secret")
    os.symlink(tmp_path / "elsewhere", inbox / "sub")
    assert rejected(LocalFile(inbox / "sub" / "x.png", "sub/x.png", inbox)).code == "symlink"


def test_a_path_climbing_out_of_the_root_is_refused(inbox):
    assert rejected(LocalFile(inbox / ".." / "secret.txt", "secret.txt", inbox)).code == "outside"


def test_bad_entries_get_their_codes(inbox):
    (inbox / "dir.png").mkdir()
    os.mkfifo(inbox / "pipe.png")  # O_NONBLOCK: must not hang
    (inbox / "big.png").write_bytes(b"x" * 1001)
    assert rejected(LocalFile(inbox / "dir.png", "dir.png", inbox)).code == "is_directory"
    assert rejected(LocalFile(inbox / "pipe.png", "pipe.png", inbox)).code == "not_a_file"
    assert rejected(LocalFile(inbox / "big.png", "big.png", inbox)).code == "too_many_bytes"
    assert rejected(LocalFile(inbox / "gone.png", "gone.png", inbox)).code == "vanished"
    assert rejected(LocalFile(inbox / "gone" / "x.png", "gone/x.png", inbox)).code == "vanished"


def test_a_file_that_grows_while_it_is_read_is_read_again_later(inbox, monkeypatch):
    """A writer appends between the fstat and the read (made to happen there, so the test never depends on
    timing): the read sees it and gives the item back for later."""
    path = inbox / "growing.png"
    path.write_bytes(b"x" * 100)
    real_read = os.read

    def read_after_an_append(fd, n):
        with open(path, "ab") as f:
            f.write(b"more")
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read_after_an_append)
    with pytest.raises(TransientError) as info:
        LocalFile(path, "growing.png", inbox).read(1000)
    assert info.value.code == "changed"
    with pytest.raises(InputRejected) as info:  # past the limit while being read: refused
        LocalFile(path, "growing.png", inbox).read(len(path.read_bytes()))
    assert info.value.code == "too_many_bytes"


# -- dispose ------------------------------------------------------------------------------------------------------


def read_file(inbox, name="a.png", data=b"first", **kw) -> LocalFile:
    (inbox / name).write_bytes(data)
    src = LocalFile(inbox / name, name, inbox, **kw)
    src.read(1000)
    return src


def test_delete_removes_the_file_that_was_read(inbox):
    read_file(inbox).dispose("delete")
    assert not (inbox / "a.png").exists()


def test_nothing_is_done_to_a_file_never_read(inbox):
    (inbox / "a.png").write_bytes(b"first")
    LocalFile(inbox / "a.png", "a.png", inbox, processed=inbox / "processed").dispose("delete")
    LocalFile(inbox / "a.png", "a.png", inbox, processed=inbox / "processed").dispose("move")
    assert (inbox / "a.png").read_bytes() == b"first"


def test_keep_keeps(inbox):
    read_file(inbox).dispose("keep")
    assert (inbox / "a.png").exists()


def test_a_newer_version_is_left_alone(inbox, tmp_path):
    src = read_file(inbox, processed=inbox / "processed")
    (tmp_path / "new.png").write_bytes(b"second")
    os.replace(tmp_path / "new.png", inbox / "a.png")  # another inode under the same name
    src.dispose("delete")
    src.dispose("move")
    assert (inbox / "a.png").read_bytes() == b"second"


def test_a_file_rewritten_in_place_is_left_alone(inbox):
    src = read_file(inbox)
    with open(inbox / "a.png", "wb") as f:  # same inode, new bytes
        f.write(b"second!")
    src.dispose("delete")
    assert (inbox / "a.png").read_bytes() == b"second!"


def test_a_symlink_swapped_in_after_the_read_is_never_moved(inbox, tmp_path):
    src = read_file(inbox, processed=inbox / "processed")
    os.symlink(tmp_path / "secret.txt", tmp_path / "link")
    os.replace(tmp_path / "link", inbox / "a.png")
    src.dispose("move")
    src.dispose("delete")
    assert (inbox / "a.png").is_symlink() and not (inbox / "processed").exists()


@pytest.mark.parametrize("disposition", ["move", "delete"])
def test_a_symlink_swapped_in_between_the_look_and_the_rename_is_given_back(inbox, tmp_path, monkeypatch,
                                                                             disposition):
    """The swap is made to happen inside the window (so the test never depends on timing)."""
    src = read_file(inbox, processed=inbox / "processed")
    real_rename = os.rename

    def swap_then_rename(a, b, *args, **kwargs):
        if str(a) == str(inbox / "a.png"):
            os.symlink(tmp_path / "secret.txt", tmp_path / "link")
            os.replace(tmp_path / "link", inbox / "a.png")
        return real_rename(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "rename", swap_then_rename)
    src.dispose(disposition)
    assert os.readlink(inbox / "a.png") == str(tmp_path / "secret.txt")
    assert sorted(p.name for p in inbox.rglob("*") if not p.is_dir()) == ["a.png"]  # nothing else left anywhere


def test_move_renames_into_the_processed_folder_under_a_free_name(inbox):
    (inbox / "processed" / "box").mkdir(parents=True)
    (inbox / "processed" / "box" / "a.png").write_bytes(b"an earlier one")
    (inbox / "box").mkdir()
    (inbox / "box" / "a.png").write_bytes(b"first")
    src = LocalFile(inbox / "box" / "a.png", "box/a.png", inbox, processed=inbox / "processed")
    src.read(1000)
    src.dispose("move")
    assert not (inbox / "box" / "a.png").exists()
    assert (inbox / "processed" / "box" / "a (2).png").read_bytes() == b"first"
    assert (inbox / "processed" / "box" / "a.png").read_bytes() == b"an earlier one"


# -- places -------------------------------------------------------------------------------------------------------


def test_a_place_makes_its_folders_only_when_it_writes(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    place.remove_orphans(lambda pid: False)
    place.url("a.png")
    assert not (tmp_path / "failed").exists()
    place.put_failure("a.png", RECORD, None)
    assert (tmp_path / "failed" / "a.png.error.json").exists()


def test_put_failure_writes_the_record_and_exactly_the_bytes(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    where = place.put_failure("box/x.png", RECORD, b"\x00bad bytes")
    assert where == str(tmp_path / "failed" / "box" / "x.png")
    assert open(where, "rb").read() == b"\x00bad bytes"
    record = json.loads(open(where + ".error.json").read())
    assert record == {**RECORD, "input_kept": True}
    assert os.listdir(tmp_path / "failed" / ".superres" / "tmp") == []  # no temp files left


def test_a_second_failure_of_the_same_name_never_overwrites_the_first(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    first = place.put_failure("x.png", {**RECORD, "message": "first"}, None)  # no bytes: only a record
    second = place.put_failure("x.png", {**RECORD, "message": "second"}, b"two")
    third = place.put_failure("x.png", {**RECORD, "message": "third"}, None)
    assert len({first, second, third}) == 3
    assert json.loads(open(first + ".error.json").read())["message"] == "first"
    assert json.loads(open(first + ".error.json").read())["input_kept"] is False
    assert not os.path.exists(first)
    assert json.loads(open(second + ".error.json").read())["message"] == "second"
    assert open(second, "rb").read() == b"two"
    assert json.loads(open(third + ".error.json").read())["message"] == "third"


def test_failures_at_the_same_time_get_names_of_their_own(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    wheres = []
    threads = [threading.Thread(target=lambda i=i: wheres.append(place.put_failure("x.png", RECORD, b"%d" % i)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(wheres)) == 8
    assert sorted(open(w, "rb").read() for w in wheres) == [b"%d" % i for i in range(8)]


def test_remove_failure_removes_both_and_minds_nothing_missing(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    where = place.put_failure("x.png", RECORD, b"bytes")
    place.remove_failure(where)
    assert not os.path.lexists(where) and not os.path.lexists(where + ".error.json")
    place.remove_failure(where)
    (tmp_path / "other.png").write_bytes(b"not the place's")
    place.remove_failure(str(tmp_path / "other.png"))  # outside the place: untouched
    assert (tmp_path / "other.png").exists()


def test_names_too_long_for_the_file_system_are_shortened_to_fit(tmp_path):
    place = LocalPlace(tmp_path / "failed")
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    long_a, long_b = "a" * 1011 + ".png", "a" * 1010 + "b.png"  # the same start: still two names
    wheres = [place.put_failure(f"in/{name}", RECORD, b"bytes") for name in (long_a, long_b)]
    assert len(set(wheres)) == 2
    for where in wheres:
        name = os.path.basename(where)
        assert name.startswith("aaaa") and name.endswith(".png") and "~" in name
        assert len(os.fsencode(name + ".error.json")) <= name_max
        assert open(where, "rb").read() == b"bytes"
    # a tree deeper than PATH_MAX: one name, directly in the failed folder
    deep = "/".join(["d" * 200] * 25) + "/x.png"
    where = place.put_failure(deep, RECORD, b"deep")
    assert os.path.dirname(where) == str(tmp_path / "failed") and os.path.basename(where).startswith("x~")
    assert open(where, "rb").read() == b"deep"


def test_url_refuses_names_that_cannot_be_files_here(tmp_path):
    place = LocalPlace(tmp_path / "out")
    assert place.url("box/a.png") == str(tmp_path / "out" / "box" / "a.png")
    for rel in ("in/" + "a" * 1011 + ".png", "/".join(["d" * 200] * 25) + "/x.png", "é" * 128 + ".png"):
        with pytest.raises(InputRejected) as info:
            place.url(rel)
        assert info.value.code == "name_too_long" and info.value.stage == "publish"
        assert "allows" in info.value.message
