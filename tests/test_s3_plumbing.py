"""imgflow/s3.py against the real S3 server (the session's SeaweedFS)."""

from __future__ import annotations

import pytest

from imgflow.s3 import explain, is_s3_uri, parse_s3_uri, s3_client, s3_uri
from imgflow.settings import Settings


def test_uri_round_trip_with_spaces_unicode_and_dots():
    for key in ["a/b c.jpg", "ünï/cödé.png", "x/../y.jpg", ""]:
        uri = s3_uri("bucket", key)
        assert is_s3_uri(uri)
        loc = parse_s3_uri(uri)
        assert (loc.bucket, loc.key) == ("bucket", key)
    with pytest.raises(ValueError, match="without a bucket"):
        parse_s3_uri("s3:///key")
    with pytest.raises(ValueError, match="not an s3"):
        parse_s3_uri("/local/path")


def test_client_from_settings_and_errors_name_the_setting_not_the_secret(s3_server, s3_bucket, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    good = Settings(s3=s3_server.settings_section())
    client = s3_client(good)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"

    wrong_secret = "not-the-secret-" + "z" * 20
    bad = Settings(s3={**s3_server.settings_section(), "secret_access_key": wrong_secret})
    with pytest.raises(Exception) as info:
        s3_client(bad, max_attempts=1).list_objects_v2(Bucket=s3_bucket)
    err = explain(info.value, f"s3://{s3_bucket}/")
    assert "IMGFLOW_S3__SECRET_ACCESS_KEY" in str(err) and not err.retriable
    assert wrong_secret not in str(err) and s3_server.secret_access_key not in str(err)

    with pytest.raises(Exception) as info:
        client.list_objects_v2(Bucket="no-such-bucket-imgflow")
    assert explain(info.value, "s3://no-such-bucket-imgflow/").code == "NoSuchBucket"

    # The standard AWS variables work when the settings leave them empty.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert s3_client(Settings()).get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"

    unreachable = Settings(s3={**s3_server.settings_section(), "endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(Exception) as info:
        s3_client(unreachable, timeout_s=1, max_attempts=1).list_objects_v2(Bucket=s3_bucket)
    err = explain(info.value, f"s3://{s3_bucket}/")
    assert err.retriable and "IMGFLOW_S3__ENDPOINT_URL" in str(err)
