"""The local-folder watcher: one event per image version, state across restarts."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from PIL import Image

from tests.kafka_helpers import decoded
from watchers.local import LocalWatcher, WatcherState, current_event_ids


def make_png(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    old = time.time() - 60
    os.utime(path, (old, old))  # settled long ago


def events_on(settings):
    return decoded(settings, settings.topics.new, "ImageEvent")


def test_publishes_each_image_once_across_restarts(settings, tmp_path):
    folder = tmp_path / "in"
    make_png(folder / "a.png")
    make_png(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"x")
    watcher = LocalWatcher(folder, settings)
    assert watcher.poll_once() == 2
    assert watcher.poll_once() == 0
    watcher.state.close()
    restarted = LocalWatcher(folder, settings)  # same state file
    assert restarted.poll_once() == 0
    evs = events_on(settings)
    assert sorted(e["image_path"] for e in evs) == sorted(str((folder / p).resolve()) for p in ["a.png", "sub/b.jpg"])
    assert {e["event_id"] for e in evs} == current_event_ids(folder, settings)
    assert all(e["uri"].startswith("file:///") and e["source"] == "local" for e in evs)


def test_identical_bytes_are_two_events_and_overwrite_is_a_new_one(settings, tmp_path):
    folder = tmp_path / "in"
    make_png(folder / "a.png")
    shutil.copy2(folder / "a.png", folder / "copy.png")
    watcher = LocalWatcher(folder, settings)
    assert watcher.poll_once() == 2
    make_png(folder / "a.png", color="blue")
    os.utime(folder / "a.png", (time.time() - 30, time.time() - 30))
    assert watcher.poll_once() == 1
    evs = events_on(settings)
    assert len({e["event_id"] for e in evs}) == 3
    assert sum(e["image_path"].endswith("a.png") for e in evs) == 2


def test_file_still_being_written_waits_until_settled(settings, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    watcher = LocalWatcher(folder, settings)  # settle_s = 0.3 in tests
    path = folder / "growing.png"
    path.write_bytes(b"\x89PNG partial")
    assert watcher.poll_once() == 0  # just written: not yet
    time.sleep(0.1)
    path.write_bytes(b"\x89PNG partial, more")
    assert watcher.poll_once() == 0  # changed since: still not
    time.sleep(0.5)
    assert watcher.poll_once() == 1
    (ev,) = events_on(settings)
    assert ev["size"] == len(b"\x89PNG partial, more")


def test_state_survives_reopen(tmp_path):
    state = WatcherState(tmp_path / "s.sqlite")
    state.add_many([{"event_id": "e1", "uri": "file:///a"}])
    state.close()
    again = WatcherState(tmp_path / "s.sqlite")
    assert again.has("e1") and not again.has("e2") and again.count() == 1


def test_every_image_named_file_gets_an_event_even_when_it_cannot_be_read(settings, tmp_path):
    """No silent skips: a dangling symlink, a symlink loop, a FIFO and an unreadable file
    named like images are published, and reading each gives a reason (its error row)."""
    from imgflow.errors import BadInput
    from imgflow.images import ImageSource

    folder = tmp_path / "in"
    make_png(folder / "ok.png")
    (folder / "dangling.jpg").symlink_to(folder / "missing.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "fifo.jpg")
    make_png(folder / "locked.png")
    os.chmod(folder / "locked.png", 0)
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # a format the models cannot take
    watcher = LocalWatcher(folder, settings)
    watcher.poll_once()
    time.sleep(settings.watch.settle_s + 0.1)
    watcher.poll_once()  # files that cannot be stat'ed wait settle_s like new ones
    evs = {os.path.basename(e["image_path"]): e for e in events_on(settings)}
    assert sorted(evs) == ["dangling.jpg", "fifo.jpg", "locked.png", "loop.png", "ok.png", "photo.heic"]
    assert {e["event_id"] for e in evs.values()} == current_event_ids(folder, settings)
    assert watcher.poll_once() == 0
    source = ImageSource(settings.model_copy(update={"allowed_roots": [folder]}))
    assert source.read(evs["ok.png"]["uri"])
    reasons = {"dangling.jpg": "file not found", "loop.png": "cannot resolve", "fifo.jpg": "not a regular file"}
    if os.geteuid() != 0:  # root reads mode-000 files (test_bad_input.py drops that capability)
        reasons["locked.png"] = "permission denied"
    from imgflow.images import prepare_image

    with pytest.raises(BadInput, match="unsupported format"):
        prepare_image(source.read(evs["photo.heic"]["uri"]), 384)
    for name, says in reasons.items():
        try:
            source.read(evs[name]["uri"])
        except BadInput as exc:
            assert says in str(exc), (name, str(exc))
        else:
            raise AssertionError(f"{name} was read")


def test_a_symlink_out_of_the_folder_is_named_as_found_and_refused_saying_where_it_points(settings, tmp_path):
    """photo.jpg in the folder is a link to a file elsewhere: its event (and so its row) names
    photo.jpg, not the target, and reading it is refused with where it points and why. A link
    to another file of the folder is read, under its own name."""
    from imgflow.errors import BadInput
    from imgflow.images import ImageSource

    folder = tmp_path / "in"
    make_png(folder / "real.png")
    secret = tmp_path / "elsewhere" / "secret.png"
    make_png(secret)
    (folder / "photo.jpg").symlink_to(secret)
    (folder / "alias.png").symlink_to(folder / "real.png")
    watcher = LocalWatcher(folder, settings)
    watcher.poll_once()
    evs = {os.path.basename(e["image_path"]): e for e in events_on(settings)}
    assert sorted(evs) == ["alias.png", "photo.jpg", "real.png"]
    assert evs["photo.jpg"]["image_path"] == str(folder.resolve() / "photo.jpg")
    assert evs["alias.png"]["image_path"] == str(folder.resolve() / "alias.png")
    assert {e["event_id"] for e in evs.values()} == current_event_ids(folder, settings)
    source = ImageSource(settings.model_copy(update={"allowed_roots": [folder]}))
    assert source.read(evs["alias.png"]["uri"]) == (folder / "real.png").read_bytes()
    with pytest.raises(BadInput) as refused:
        source.read(evs["photo.jpg"]["uri"])
    message = str(refused.value)
    assert str(folder.resolve() / "photo.jpg") in message
    assert f"symbolic link to {secret.resolve()}" in message and "outside the allowed roots" in message
