"""The S3 watcher against a real S3 server (SeaweedFS): polling with a persisted cursor,
notifications, and the faults a bucket brings (wrong credentials, missing bucket, an
endpoint that is down or restarting)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from imgflow.events import s3_image_event
from imgflow.images import ImageSource
from imgflow.s3 import S3Error, parse_s3_uri, s3_client, s3_uri
from tests.conftest import make_settings, new_bucket, settings_env
from tests.kafka_helpers import decoded, produce, wait_until
from watchers.s3 import current_event_ids, iter_objects
from watchers.s3_notify import parse_notification
from watchers.s3_watcher import S3Watcher
from watchers.seaweedfs_events import message_classes

ROOT = Path(__file__).resolve().parents[1]


def client_for(s3) -> object:
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key, region_name="us-east-1")


def events_on(settings, topic=None):
    return decoded(settings, topic or settings.topics.new, "ImageEvent")


def test_polling_publishes_each_object_version_once_across_restarts(s3_settings, s3_server, s3_bucket):
    c = client_for(s3_server)
    keys = ["in/a b.jpg", "in/b ünïcødé ñ.png", "in/zero.jpg", "in/sub/c.JPG", "in/m..dots.gif"]
    for key in keys:
        c.put_object(Bucket=s3_bucket, Key=key, Body=b"" if "zero" in key else key.encode())
    c.put_object(Bucket=s3_bucket, Key="in/notes.txt", Body=b"not an image")
    c.put_object(Bucket=s3_bucket, Key="in/folder/", Body=b"")  # a "folder" marker
    c.put_object(Bucket=s3_bucket, Key="other/x.jpg", Body=b"outside the prefix")
    # An upload in progress is invisible until it completes.
    upload = c.create_multipart_upload(Bucket=s3_bucket, Key="in/zz-uploading.jpg")
    c.upload_part(Bucket=s3_bucket, Key="in/zz-uploading.jpg", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000)
    # SeaweedFS refuses keys with "../" segments outright (AWS would store them; the vision
    # stage's prefix check covers that case, see test_s3_input.py).
    with pytest.raises(ClientError):
        c.put_object(Bucket=s3_bucket, Key="in/../escape.jpg", Body=b"x")

    location = parse_s3_uri(f"s3://{s3_bucket}/in/")
    watcher = S3Watcher(location, s3_settings)
    assert watcher.poll_once() == len(keys)
    assert watcher.poll_once() == 0
    watcher.state.close()
    restarted = S3Watcher(location, s3_settings)  # same state file: nothing again
    assert restarted.poll_once() == 0

    evs = events_on(s3_settings)
    assert sorted(e["image_path"] for e in evs) == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    assert {e["event_id"] for e in evs} == current_event_ids(location, s3_settings)
    zero = next(e for e in evs if e["image_path"].endswith("zero.jpg"))
    assert zero["size"] == 0 and zero["source"] == "s3"
    for e in evs:  # the uri is what the vision stage reads: it round-trips to the key
        assert parse_s3_uri(e["uri"]).key == e["image_path"].split("/", 3)[3]

    # Overwritten: a new ETag is a new image. A key sorting before the cursor is found by the
    # full pass. The upload completes: now it is an object.
    c.put_object(Bucket=s3_bucket, Key="in/a b.jpg", Body=b"new content")
    c.put_object(Bucket=s3_bucket, Key="in/0-early.jpg", Body=b"sorts first")
    c.complete_multipart_upload(
        Bucket=s3_bucket,
        Key="in/zz-uploading.jpg",
        UploadId=upload["UploadId"],
        MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": c.list_parts(Bucket=s3_bucket, Key="in/zz-uploading.jpg", UploadId=upload["UploadId"])["Parts"][0]["ETag"]}]
        },
    )
    assert restarted.tail_pass() == 1  # only "zz-uploading.jpg" sorts after the cursor
    restarted._next_full = 0.0
    assert restarted.poll_once() == 2  # the full pass: the overwrite and "0-early.jpg"
    assert restarted.poll_once() == 0
    evs = events_on(s3_settings)
    assert len(evs) == len(keys) + 3 and len({e["event_id"] for e in evs}) == len(evs)
    assert sum(e["image_path"].endswith("a b.jpg") for e in evs) == 2


def test_listing_is_page_by_page_in_key_order(s3_server, s3_bucket):
    c = client_for(s3_server)
    keys = [f"p/{i:03d}.jpg" for i in range(7)]
    for key in keys:
        c.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    calls = []
    c.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(kw["params"]))
    assert [o.key for o in iter_objects(c, s3_bucket, "p/", page_size=3)] == keys
    assert len(calls) == 3  # 3 + 3 + 1: never more than a page held
    assert [o.key for o in iter_objects(c, s3_bucket, "p/", start_after="p/004.jpg")] == keys[5:]


def test_notifications_publish_within_seconds_and_polling_adds_no_double(s3_settings, s3_server, s3_bucket):
    """MinIO's Kafka target (S3 event JSON) and SeaweedFS filer protobuf messages: a
    notification makes the watcher HEAD the object and publish it exactly as polling would."""
    c = client_for(s3_server)
    c.put_object(Bucket=s3_bucket, Key="n/cat photo.jpg", Body=b"one")
    c.put_object(Bucket=s3_bucket, Key="n/seaweed.png", Body=b"two")
    c.put_object(Bucket=s3_bucket, Key="n/never-notified.jpg", Body=b"three")
    topic = f"{s3_settings.topics.new}.s3-events"
    settings = s3_settings.model_copy(update={"watch": s3_settings.watch.model_copy(update={"s3_notify": "minio", "s3_notify_topic": topic})})
    record = {
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": s3_bucket}, "object": {"key": "n/cat+photo.jpg", "size": 3, "eTag": "ignored: the watcher HEADs"}},
    }
    gone = {**record, "s3": {**record["s3"], "object": {"key": "n/deleted.jpg"}}}
    removed = {**record, "eventName": "s3:ObjectRemoved:Delete"}
    elsewhere = {**record, "s3": {**record["s3"], "bucket": {"name": "another-bucket"}}}
    watcher = S3Watcher(parse_s3_uri(f"s3://{s3_bucket}/n/"), settings)
    watcher.open_notifications()  # creates the notification topic where it is missing
    produce(
        settings,
        topic,
        [
            (f"{s3_bucket}/n/cat photo.jpg", json.dumps({"Records": [record]}).encode()),
            ("x", json.dumps({"Records": [gone, removed, elsewhere]}).encode()),
            ("x", b"\x00 not json"),
            ("x", json.dumps({"Records": [record]}).encode()),
        ],
    )  # a repeat
    try:
        t0 = time.monotonic()
        wait_until(lambda: watcher.handle_notifications(1.0), 30, interval=0, what="the notified object's event")
        took = time.monotonic() - t0
        evs = events_on(settings)
        assert len(evs) == 1, [(e["image_path"], e["event_id"]) for e in evs]
        (ev,) = evs
        assert ev["image_path"] == f"s3://{s3_bucket}/n/cat photo.jpg" and took < 20
        # The SeaweedFS format, as its filer publishes it (protobuf EventNotification).
        event_cls, entry_cls = message_classes()
        value = event_cls(new_entry=entry_cls(name="seaweed.png"), new_parent_path=f"/buckets/{s3_bucket}/n")
        assert parse_notification(value.SerializeToString(), "seaweedfs") == [(s3_bucket, "n/seaweed.png")]
        deleted = event_cls(old_entry=entry_cls(name="seaweed.png"))
        assert parse_notification(deleted.SerializeToString(), "seaweedfs") == []
    finally:
        watcher.notifications.close()
        watcher.notifications = None
    # Polling (the fallback) finds only what no notification announced.
    assert watcher.poll_once() == 2
    paths = sorted(e["image_path"] for e in events_on(settings))
    assert paths == sorted(f"s3://{s3_bucket}/n/{k}" for k in ["cat photo.jpg", "seaweed.png", "never-notified.jpg"])


def test_wrong_credentials_missing_bucket_unreachable_endpoint_are_clear_errors(s3_settings, s3_server, s3_bucket, tmp_path, caplog):
    secret = s3_server.secret_access_key
    wrong_secret = s3_settings.model_copy(
        update={"s3": s3_settings.s3.model_copy(update={"secret_access_key": type(s3_settings.s3.secret_access_key)("not-" + secret)})}
    )
    wrong_key = s3_settings.model_copy(update={"s3": s3_settings.s3.model_copy(update={"access_key_id": type(s3_settings.s3.access_key_id)("AKIAWRONG")})})
    down = s3_settings.model_copy(update={"s3": s3_settings.s3.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1, "timeout_s": 1.0})})
    cases = [
        (wrong_secret, s3_bucket, "IMGFLOW_S3__SECRET_ACCESS_KEY"),
        (wrong_key, s3_bucket, "IMGFLOW_S3__ACCESS_KEY_ID"),
        (s3_settings, "no-such-bucket-here", "bucket does not exist"),
        (down, s3_bucket, "IMGFLOW_S3__ENDPOINT_URL"),
    ]
    caplog.set_level(logging.DEBUG)
    for settings, bucket, says in cases:
        watcher = S3Watcher(parse_s3_uri(f"s3://{bucket}/p/"), settings)
        with pytest.raises(S3Error) as err:
            watcher.check()
        assert says in str(err.value) and f"s3://{bucket}/p/" in str(err.value), str(err.value)
        assert secret not in str(err.value)
        # The loop does not die: it logs the reason and backs off.
        assert watcher._failed(err.value) > 0
        watcher.state.close()
    # Running with a wrong secret: the loop stays up, says why once (not once per retry), backs off.
    caplog.clear()
    watcher = S3Watcher(parse_s3_uri(f"s3://{s3_bucket}/p/"), wrong_secret)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: watcher._failures >= 2, 30, interval=0.1, what="two failed polls")
        assert thread.is_alive()
    finally:
        watcher.request_stop()
        thread.join(30)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "SECRET_ACCESS_KEY" in r.getMessage()]
    assert len(errors) == 1 and "retrying with back-off" in errors[0].getMessage()
    assert secret not in caplog.text and "not-" + secret not in caplog.text

    # The command: exit 2 at once, the setting named, no secret on the terminal.
    env = {**settings_env(s3_settings), **s3_server.env(), "IMGFLOW_S3__SECRET_ACCESS_KEY": "not-" + secret}
    proc = subprocess.run(
        [sys.executable, "-m", "imgflow", "watch", "s3", f"s3://{s3_bucket}/p/"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "IMGFLOW_S3__SECRET_ACCESS_KEY" in proc.stderr, proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_seaweedfs_notifications_and_an_s3_restart(broker, tmp_path, caplog):
    """Its own SeaweedFS (the embedded stack's), whose filer publishes object events to the
    session's tansu broker as SeaweedFS users configure it: notification.toml in its working
    directory. New objects that polling would not find for an hour (they sort before the
    cursor; the full pass is due in 3600 s) become events within seconds, through the
    notifications. SeaweedFS is SIGKILLed and restarted meanwhile: the watcher keeps running
    and every object is published exactly once."""
    from imgflow.app.stack import EmbeddedStack
    from tests.conftest import S3Server

    topic = f"seaweedfs-events-{tmp_path.name}"
    stack_dir = tmp_path / "stack"
    stack_dir.mkdir()
    (stack_dir / "notification.toml").write_text(f'[notification.kafka]\nenabled = true\nhosts = ["{broker}"]\ntopic = "{topic}"\n')
    # Events go to the session broker; only S3 is killed. The topics, the notification topic
    # too, exist before the store starts publishing (as `imgflow topics` makes them).
    watch = {"poll_interval_s": 0.3, "s3_full_scan_s": 3600.0, "s3_notify": "seaweedfs", "s3_notify_topic": topic}
    make_settings(broker, tmp_path, watch=watch)
    stack = EmbeddedStack(stack_dir, port=0, log_file=tmp_path / "stack.log").start()
    try:
        creds = json.loads((stack.data_dir / "s3-credentials.json").read_text())
        s3 = S3Server(stack.s3_endpoint, creds["access_key_id"], creds["secret_access_key"])
        bucket = new_bucket(s3)
        settings = make_settings(broker, tmp_path, s3={**s3.settings_section(), "timeout_s": 2.0, "max_attempts": 1}, watch=watch)
        c = client_for(s3)
        for i in range(3):
            c.put_object(Bucket=bucket, Key=f"k/5-{i}.jpg", Body=b"x%d" % i)
        caplog.set_level(logging.INFO)
        watcher = S3Watcher(parse_s3_uri(f"s3://{bucket}/k/"), settings, client=s3_client(settings))
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(events_on(settings)) >= 3, 30, what="3 events")
            notified_before = notified()
            t0 = time.monotonic()
            c.put_object(Bucket=bucket, Key="k/0-a.jpg", Body=b"new")  # sorts before the cursor
            wait_until(lambda: len(events_on(settings)) >= 4, 30, interval=0.2, what="the notified object")
            assert time.monotonic() - t0 < 20
            # Held down until both have seen it: the runner's restart alone can be quicker than
            # one poll, which made the outage a race.
            stack.kill_s3(hold=True)
            # The vision stage's read waits for the store instead of failing a good image.
            read = ThreadPoolExecutor(1).submit(ImageSource(settings).read, s3_uri(bucket, "k/5-1.jpg"))
            wait_until(lambda: "retrying with back-off" in caplog.text, 30, interval=0.2, what="the watcher to see S3 down")
            wait_until(lambda: "S3 endpoint unreachable" in caplog.text, 30, interval=0.2, what="the read to see S3 down")
            assert not read.done()
            stack.release_s3()
            assert read.result(timeout=90) == b"x1"
            wait_until(lambda: _s3_up(c), 60, what="SeaweedFS restarted")
            for name in ("0-b", "0-c"):
                c.put_object(Bucket=bucket, Key=f"k/{name}.jpg", Body=name.encode())
            wait_until(lambda: len(events_on(settings)) >= 6, 60, what="6 events")
            time.sleep(1.0)  # a double would appear now
            assert thread.is_alive()
        finally:
            watcher.request_stop()
            thread.join(30)
        evs = events_on(settings)
        assert sorted(e["image_path"] for e in evs) == sorted(f"s3://{bucket}/k/{n}.jpg" for n in ["5-0", "5-1", "5-2", "0-a", "0-b", "0-c"])
        assert notified() - notified_before == 3  # all three through notifications, none by polling
        assert "recovered" in caplog.text
        assert s3.secret_access_key not in caplog.text
        assert {e["event_id"] for e in evs} == {
            s3_image_event(bucket, o.key, o.etag, o.size, source="s3", run_id="live")["event_id"] for o in iter_objects(c, bucket, "k/")
        }
    finally:
        stack.stop()


def notified() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("imgflow_watcher_published_total", {"source": "notification"}) or 0.0


def _s3_up(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - still down
        return False
