"""Unit: the [storage] settings of the object store, and that its credentials are never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.clients import s3_client, s3_credentials
from diana.config import ConfigError, load_config
from diana.storage import FilesystemStore, S3Store, open_store

SECRET = "s3cr3t-never-printed-0123456789"


def test_the_backend_is_a_choice_and_filesystem_is_the_default(tmp_path: Path):
    assert load_config(environ={}).storage.backend == "filesystem"
    with pytest.raises(ConfigError, match="filesystem, s3"):
        load_config(environ={"DIANA_STORAGE_BACKEND": "ftp"})
    cfg = load_config(environ={"DIANA_STORAGE_ARCHIVE_DIR": str(tmp_path / "a")})
    archive = open_store(cfg, "archive")
    assert isinstance(archive, FilesystemStore) and archive.root == tmp_path / "a"
    assert not (tmp_path / "a").exists()  # opening a store for reading creates nothing


def test_keys_from_the_environment_are_left_out_of_repr_and_go_to_the_client():
    cfg = load_config(
        environ={
            "DIANA_STORAGE_BACKEND": "s3",
            "DIANA_STORAGE_S3_ENDPOINT": "http://127.0.0.1:1",
            "DIANA_STORAGE_S3_ACCESS_KEY_ID": "diana-id",
            "DIANA_STORAGE_S3_SECRET_ACCESS_KEY": SECRET,
        }
    )
    assert SECRET not in repr(cfg) and "diana-id" not in repr(cfg)
    assert s3_credentials(cfg.storage) == ("diana-id", SECRET)
    store = open_store(cfg, "quarantine")
    assert isinstance(store, S3Store) and store.prefix == "quarantine/"
    assert SECRET not in repr(store) and store.uri("a/b.dcm") == "s3://diana-star/quarantine/a/b.dcm"
    assert store.client.meta.endpoint_url == "http://127.0.0.1:1"


def test_one_key_without_the_other_is_a_configuration_error():
    with pytest.raises(ConfigError, match="set together"):
        load_config(environ={"DIANA_STORAGE_S3_SECRET_ACCESS_KEY": SECRET})


def test_credentials_file_in_the_aws_format(tmp_path: Path):
    good = tmp_path / "credentials"
    good.write_text(f"[default]\naws_access_key_id = diana-id\naws_secret_access_key = {SECRET}\n")
    cfg = load_config(environ={"DIANA_STORAGE_S3_CREDENTIALS_FILE": str(good)})
    assert s3_credentials(cfg.storage) == ("diana-id", SECRET)
    s3_client(cfg.storage)  # builds without contacting anything
    bad = tmp_path / "bad"
    bad.write_text(f"secret = {SECRET}\n")
    with pytest.raises(ConfigError, match="aws_access_key_id") as caught:
        s3_credentials(load_config(environ={"DIANA_STORAGE_S3_CREDENTIALS_FILE": str(bad)}).storage)
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="does not exist"):
        s3_credentials(load_config(environ={"DIANA_STORAGE_S3_CREDENTIALS_FILE": str(tmp_path / "none")}).storage)


def test_parts_smaller_than_s3_allows_are_refused():
    with pytest.raises(ConfigError, match="at least 5 MiB"):
        load_config(environ={"DIANA_STORAGE_S3_PART_SIZE_MB": "4"})


def test_a_short_s3_secret_key_is_refused_as_a_short_password_is(tmp_path: Path):
    """Redaction leaves values under 8 characters alone (they would eat ordinary words), and secret_value
    refuses passwords that short; the S3 secret key was remembered anyway, silently unmasked when short.
    Now a short one is a configuration error naming the setting, from the environment or the file."""
    from diana.credentials import redact

    short = "k3y-s3c"  # 7 characters
    cfg = load_config(
        environ={"DIANA_STORAGE_S3_ACCESS_KEY_ID": "diana-id", "DIANA_STORAGE_S3_SECRET_ACCESS_KEY": short}
    )
    with pytest.raises(ConfigError, match=r"\[storage\] s3_secret_access_key: .*at least 8 characters") as caught:
        s3_credentials(cfg.storage)
    assert short not in str(caught.value)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = diana-id\naws_secret_access_key = {short}\n")
    cfg = load_config(environ={"DIANA_STORAGE_S3_CREDENTIALS_FILE": str(credentials)})
    with pytest.raises(ConfigError, match="aws_secret_access_key: .*at least 8 characters") as caught:
        s3_credentials(cfg.storage)
    assert short not in str(caught.value)
    eight = "k3y-s3c8"
    cfg = load_config(
        environ={"DIANA_STORAGE_S3_ACCESS_KEY_ID": "diana-id", "DIANA_STORAGE_S3_SECRET_ACCESS_KEY": eight}
    )
    assert s3_credentials(cfg.storage) == ("diana-id", eight)
    assert redact(f"signature for {eight} failed") == "signature for *** failed"
