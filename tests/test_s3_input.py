"""Images from a bucket: the vision stage reads s3:// objects (streaming GET, allowed
prefixes, size limit, clear errors) and `imgflow run s3://... --once` processes a prefix
end to end against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from PIL import Image
from pydantic import SecretStr
from skimage import data

from imgflow.errors import BadInput, StageConfigError
from imgflow.events import s3_image_event
from imgflow.images import ImageSource
from imgflow.s3 import S3Error, s3_uri
from tests.chaos import committed_rows

ROOT = Path(__file__).resolve().parents[1]


def client_for(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key, region_name="us-east-1")


def jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def with_s3(settings, **changes):
    return settings.model_copy(update={"s3": settings.s3.model_copy(update=changes)})


def test_vision_reads_objects_only_below_allowed_prefixes_and_within_the_size_limit(s3_settings, s3_server, s3_bucket):
    c = client_for(s3_server)
    cat = jpeg(data.chelsea())
    c.put_object(Bucket=s3_bucket, Key="in/a cat ü.jpg", Body=cat)
    c.put_object(Bucket=s3_bucket, Key="in/deleted.jpg", Body=cat)
    c.put_object(Bucket=s3_bucket, Key="secret/x.jpg", Body=cat)
    settings = with_s3(s3_settings, allowed_prefixes=[f"s3://{s3_bucket}/in/"])
    settings = settings.model_copy(update={"models": settings.models.model_copy(update={"image_max_bytes": len(cat)})})
    source = ImageSource(settings)
    assert source.read(s3_uri(s3_bucket, "in/a cat ü.jpg")) == cat
    c.delete_object(Bucket=s3_bucket, Key="in/deleted.jpg")  # gone between event and processing
    refusals = {
        "in/deleted.jpg": "object not found",
        "secret/x.jpg": "outside the allowed S3 prefixes",
        "in/../secret/x.jpg": "outside the allowed S3 prefixes",  # a key that escapes when read as a path
        "in/./../secret/x.jpg": "outside the allowed S3 prefixes",
    }
    for key, says in refusals.items():
        with pytest.raises(BadInput, match=says):
            source.read(s3_uri(s3_bucket, key))
    with pytest.raises(BadInput, match="outside the allowed S3 prefixes"):
        source.read(s3_uri("another-bucket", "in/a.jpg"))
    c.put_object(Bucket=s3_bucket, Key="in/big.jpg", Body=cat + b"\0")
    with pytest.raises(BadInput, match="too large"):
        source.read(s3_uri(s3_bucket, "in/big.jpg"))

    # The store itself failing is not bad input: S3Error, retried by the stage loop, naming the
    # setting and never the secret.
    secret = s3_server.secret_access_key
    for broken, says, retriable in [
        (with_s3(settings, secret_access_key=SecretStr("wrong" + secret)), "IMGFLOW_S3__SECRET_ACCESS_KEY", False),
        (with_s3(settings, endpoint_url="http://127.0.0.1:9", max_attempts=1, timeout_s=1.0, outage_retry_s=1.0), "IMGFLOW_S3__ENDPOINT_URL", True),
    ]:
        with pytest.raises(S3Error) as err:
            ImageSource(broken).read(s3_uri(s3_bucket, "in/a cat ü.jpg"))
        assert says in str(err.value) and err.value.retriable is retriable and secret not in str(err.value)
        if retriable:  # at start-up, a store that is down is a warning: the stage starts
            ImageSource(broken).check()
        else:  # wrong credentials stop the stage at once, naming the setting
            with pytest.raises(StageConfigError, match=says):
                ImageSource(broken).check()
    with pytest.raises(StageConfigError, match="bucket does not exist"):
        ImageSource(with_s3(settings, allowed_prefixes=["s3://no-such-bucket-x/in/"])).check()
    ImageSource(settings).check()


def test_run_on_a_bucket_prefix_once(s3_server, s3_bucket, tmp_path):
    """`imgflow run s3://BUCKET/PREFIX --once`: a row per image object under the prefix (keys
    with spaces and unicode, an empty object and a non-image as error rows), nothing from
    outside the prefix, and the S3 secret nowhere in logs or outputs."""
    c = client_for(s3_server)
    objects = {
        "in/a cat ñ ü.jpg": jpeg(data.chelsea()),
        "in/sub/coffee.jpg": jpeg(data.coffee()),
        "in/empty.jpg": b"",
        "in/text.png": b"this is not a PNG\n" * 10,
    }
    for key, body in objects.items():
        c.put_object(Bucket=s3_bucket, Key=key, Body=body)
    c.put_object(Bucket=s3_bucket, Key="elsewhere/dog.jpg", Body=objects["in/sub/coffee.jpg"])
    out, data_dir = tmp_path / "out", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGFLOW_", "AWS_"))}
    # Endpoint and credentials as the standard AWS variables only (boto3's own chain).
    env.update(
        {
            "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_server.endpoint,
            "IMGFLOW_MODELS__LLM": "smollm2-135m",
            "HF_HUB_OFFLINE": "1",
            "IMGFLOW_STAGE__MAX_ATTEMPTS": "2",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "imgflow", "run", f"s3://{s3_bucket}/in/", "--once", "--out", str(out), "--data-dir", str(data_dir), "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["image_path"]: r for r in committed_rows(out)}
    assert sorted(rows) == sorted(f"s3://{s3_bucket}/{k}" for k in objects)
    etags = {k: c.head_object(Bucket=s3_bucket, Key=k)["ETag"] for k in objects}
    for key in objects:
        row = rows[f"s3://{s3_bucket}/{key}"]
        assert row["event_id"] == s3_image_event(s3_bucket, key, etags[key], 0, source="s3", run_id="live")["event_id"]
        assert row["source_uri"] == s3_uri(s3_bucket, key)
    assert rows[f"s3://{s3_bucket}/in/a cat ñ ü.jpg"]["error"] == ""
    assert len(json.loads(rows[f"s3://{s3_bucket}/in/sub/coffee.jpg"]["image_vector"])) == 1280
    assert "empty file" in rows[f"s3://{s3_bucket}/in/empty.jpg"]["error"]
    assert "not an image" in rows[f"s3://{s3_bucket}/in/text.png"]["error"]
    secret = s3_server.secret_access_key.encode()
    for path in [*out.rglob("*"), *(data_dir / "logs").rglob("*")]:
        if path.is_file():
            assert secret not in path.read_bytes(), f"the S3 secret leaked into {path}"
    assert secret.decode() not in proc.stdout + proc.stderr
