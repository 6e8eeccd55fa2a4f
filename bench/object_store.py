"""Put and read rates of the two object stores (diana/storage) on this machine, in one run.

Starts its own S3Proxy (the local stack's, on --port, in a temporary folder it removes after),
then puts N objects of --size-kb through the filesystem store and through the S3 store, each
verified against its SHA-256 as the archive sink does, reads them back, and prints objects/s and MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from diana.compose.local.stack import LocalStack
from diana.config import load_config
from diana.storage import FilesystemStore, ObjectStore, S3Store, open_store


def _rate(store: ObjectStore, sources: list[Path], label: str) -> dict[str, float]:
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sources]
    size = sum(p.stat().st_size for p in sources)
    started = time.perf_counter()
    for number, (path, sha) in enumerate(
        tqdm(list(zip(sources, hashes, strict=True)), desc=f"{label} put", unit="obj")
    ):
        store.put_file(f"1.2.3/1.2.3.4/1.2.3.4.{number}.dcm", path, sha256=sha)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    for number in tqdm(range(len(sources)), desc=f"{label} get", unit="obj"):
        with store.open(f"1.2.3/1.2.3.4/1.2.3.4.{number}.dcm") as stream:
            while stream.read(1 << 20):
                pass
    get_s = time.perf_counter() - started
    return {
        "put_obj_s": len(sources) / put_s,
        "put_mb_s": size / put_s / 1e6,
        "get_obj_s": len(sources) / get_s,
        "get_mb_s": size / get_s / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--objects", type=int, default=200, help="objects per store (default 200)")
    ap.add_argument("--size-kb", type=int, default=512, help="size of each object (default 512 KiB, one CT slice)")
    ap.add_argument("--port", type=int, default=29000, help="S3Proxy's port (default 29000)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diana-bench-store-"))
    try:
        credentials = work / "credentials"
        credentials.write_text(
            f"[default]\naws_access_key_id = bench\naws_secret_access_key = {secrets.token_hex(20)}\n"
        )
        config_file = work / "bench.toml"
        config_file.write_text(
            f'[storage]\nbackend = "s3"\ns3_endpoint = "http://127.0.0.1:{args.port}"\n'
            f's3_bucket = "bench"\ns3_credentials_file = "{credentials}"\n'
            f'[stack]\nhome = "{work / "stack"}"\ns3proxy_port = {args.port}\n'
        )
        cfg = load_config(config_file, environ={})
        stack = LocalStack(cfg)
        sources = []
        for number in range(args.objects):
            path = work / "sources" / f"{number}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(args.size_kb * 1024))
            sources.append(path)
        stack.start_s3proxy()
        try:
            stack.wait_s3proxy()
            s3 = open_store(cfg, "archive")
            assert isinstance(s3, S3Store)
            results = {
                "filesystem": _rate(FilesystemStore(work / "archive"), sources, "filesystem"),
                "s3proxy": _rate(s3, sources, "s3proxy"),
            }
        finally:
            stack.stop_s3proxy()
        print(f"{args.objects} objects of {args.size_kb} KiB, verified puts (SHA-256), then full reads:")
        print(f"{'store':<12} {'put obj/s':>10} {'put MB/s':>9} {'get obj/s':>10} {'get MB/s':>9}")
        for name, r in results.items():
            print(
                f"{name:<12} {r['put_obj_s']:>10.0f} {r['put_mb_s']:>9.1f} {r['get_obj_s']:>10.0f} {r['get_mb_s']:>9.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
