"""Stores and runs in a bucket of a real S3 server (moto's standalone server, a process on
127.0.0.1): conversion, the fast reader and its cache, faults, and a run directory at a URL."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_SECRET, start_s3_server
from helpers import KILLED_AT_SHARD_2, make_loaddata, read_events

from cellmorph import remote
from cellmorph.config import ConvertConfig
from cellmorph.loaders import ShardReader
from cellmorph.shardfile import StoreDamage
from cellmorph.store import open_store, verify_store
from cellmorph.urlpath import URLPath
from conversion.pack import convert


def _objects(url: str) -> dict[str, bytes]:
    return {k: remote.read(f"{url}/{k}") for k, _ in remote.list_objects(url)}


def _local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _same_content(url: str, local: Path) -> None:
    """Shard files, metadata and quarantine byte-identical (zarr.json differs by its id and
    time; the manifest's header is the same job)."""
    theirs, ours = _objects(url), _local_files(local)
    keys = [
        k for k in ours if k.startswith("images/c/") or k in ("metadata.parquet", "quarantine.csv")
    ]
    assert keys and all(theirs[k] == ours[k] for k in keys)
    assert set(k for k in theirs if k.startswith("images/c/")) == {
        k for k in keys if k.startswith("images/c/")
    }


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_loaddata(tmp_path_factory.mktemp("plate"), plates=2, wells=3, sites=2, size=40)


@pytest.fixture(scope="module")
def local_ref(plate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    convert(ConvertConfig(load_data=str(plate), size=16, shard_size=2, workers=1), out)
    return out


def test_convert_into_bucket_equals_local_and_reads_back(plate, local_ref, bucket) -> None:
    url = f"{bucket}/plates.zarr"
    cfg = ConvertConfig(load_data=str(plate), size=16, shard_size=2, workers=2)  # process pool
    assert convert(cfg, url)["images"] == 12
    assert convert(cfg, url)["nothing_to_do"]
    _same_content(url, local_ref)
    store, ref = open_store(url), open_store(local_ref)
    assert store.remote and str(store.path) == url
    pd.testing.assert_frame_equal(store.metadata, ref.metadata)
    rows = np.random.default_rng(0).permutation(len(ref))
    assert np.array_equal(ShardReader(store).read(rows), ShardReader(ref).read(rows))
    assert np.array_equal(
        ShardReader(store).read_raw(rows[:3])[0], ShardReader(ref).read_raw(rows[:3])[0]
    )
    assert verify_store(store, progress=False) == []


def test_convert_into_bucket_resumes_after_sigkill(plate, local_ref, bucket, tmp_path) -> None:
    url = f"{bucket}/killed.zarr"
    run = subprocess.run([sys.executable, "-c", KILLED_AT_SHARD_2, str(plate), url],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    assert run.returncode == -9
    done = [k for k, _ in remote.list_objects(f"{url}/.convert") if k.startswith("shard-")]
    assert len(done) == 2  # two shards recorded before the kill
    summary = convert(ConvertConfig(load_data=str(plate), size=16, shard_size=2, workers=1), url)
    assert summary["written"] == 12 - 4 and summary["images"] == 12
    _same_content(url, local_ref)


def test_cache_fills_once_then_serves_later_epochs_and_stays_bounded(local_ref, bucket, tmp_path):
    url = f"{bucket}/cached.zarr"
    for key, data in _local_files(local_ref).items():
        remote.write(f"{url}/{key}", data)
    store = open_store(url)
    rows = np.arange(len(store))
    first = ShardReader(store, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 30)
    expected = ShardReader(open_store(local_ref)).read(rows)
    assert np.array_equal(first.read(rows), expected) and first.fetched_bytes > 0
    again = ShardReader(open_store(url), cache_dir=str(tmp_path / "c"), cache_bytes=1 << 30)
    assert np.array_equal(again.read(rows[::-1]), expected[::-1])
    assert again.fetched_bytes == 0  # a later epoch: local disk only
    # A cache of a few blocks keeps what fits and still returns every image.
    small = ShardReader(open_store(url), cache_dir=str(tmp_path / "s"), cache_bytes=40_000)
    assert np.array_equal(small.read(rows), expected)
    from cellmorph.loaders.cache import disk_usage

    assert 0 < small._cache.stored_bytes < first.fetched_bytes
    assert disk_usage(tmp_path / "s") <= 40_000
    # A damaged cache file is caught by the chunks' crc32c and fetched again.
    for p in (tmp_path / "c").rglob("*"):
        if p.is_file():
            p.write_bytes(b"\x00" * p.stat().st_size)
    healed = ShardReader(open_store(url), cache_dir=str(tmp_path / "c"), cache_bytes=1 << 30)
    assert np.array_equal(healed.read(rows), expected) and healed.fetched_bytes > 0


def test_damaged_or_missing_objects_are_named(local_ref, bucket) -> None:
    url = f"{bucket}/damaged.zarr"
    for key, data in _local_files(local_ref).items():
        remote.write(f"{url}/{key}", data)
    store = open_store(url)
    a, b = f"{url}/images/c/0/0/0/0", f"{url}/images/c/1/0/0/0"
    data_a = remote.read(a)
    remote.write(a, remote.read(b))  # another shard's bytes in shard 0's place
    with pytest.raises(StoreDamage, match=r"images/c/0/0/0/0.*another image's chunk"):
        ShardReader(store).read(np.array([0]))
    remote.delete(a)
    with pytest.raises(StoreDamage, match=r"damaged.zarr: images/c/0/0/0/0 is missing"):
        ShardReader(store).read(np.array([1]))
    remote.write(a, data_a)
    assert ShardReader(store).read(np.array([0, 1])).shape[0] == 2


def test_user_mistakes_are_one_line_errors_naming_the_url(bucket, tmp_path) -> None:
    bad = [sys.executable, "-m", "cellmorph", "inspect"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for url, words in (
        ("s3://no-such-bucket-cm/x.zarr", "bucket s3://no-such-bucket-cm does not exist"),
        (f"{bucket}/absent.zarr", "no such store"),
    ):
        r = subprocess.run([*bad, url], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and words in r.stderr and url in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # Wrong credentials: a server that checks them (no key is known to it).
    strict = start_s3_server(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env.update(AWS_ENDPOINT_URL=strict.url)
        r = subprocess.run([*bad, "s3://any/plates.zarr"], capture_output=True, text=True, env=env)
    finally:
        strict.stop()
    assert r.returncode == 2 and "refused the credentials (InvalidAccessKeyId)" in r.stderr
    assert "s3://any/plates.zarr" in r.stderr and TEST_SECRET not in r.stderr + r.stdout


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Forwards to the S3 server; every third request gets a 503 or a dropped connection."""

    target: str = ""
    count = 0
    failed = 0

    def _forward(self) -> None:
        cls = type(self)
        cls.count += 1
        if cls.count % 3 == 0 and cls.failed < 40:
            cls.failed += 1
            if cls.failed % 2:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.close_connection = True  # no answer at all: the client must retry
                self.connection.shutdown(2)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        host, port = cls.target.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(self.command, self.path, body, dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_transient_faults_are_retried(local_ref, bucket, s3_server, monkeypatch) -> None:
    url = f"{bucket}/flaky.zarr"
    for key, data in _local_files(local_ref).items():
        remote.write(f"{url}/{key}", data)
    _Flaky.target, _Flaky.count, _Flaky.failed = s3_server.url, 0, 0
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setattr(remote, "_stores", {})  # new clients for the proxy's endpoint
        store = open_store(url)
        rows = np.arange(len(store))
        got = ShardReader(store).read(rows)
    finally:
        proxy.shutdown()
    assert _Flaky.failed >= 3  # faults happened, and were retried through
    assert np.array_equal(got, ShardReader(open_store(local_ref)).read(rows))


@pytest.mark.slow
def test_run_directory_in_a_bucket_trains_resumes_and_reports(
    bucket, tiny_plate, small_cfg, tmp_path
):
    from cellmorph import cli
    from cellmorph.rundir import RunDir
    from cellmorph.train import run_local

    root = f"{bucket}/runs"
    store = f"{bucket}/store.zarr"
    for key, data in _local_files(tiny_plate).items():
        remote.write(f"{store}/{key}", data)
    fast = ("train.max_steps_per_epoch=2", "train.bn_calibration_images=16")
    cfg = small_cfg("url", f"run_root={root}", f"data.store={store}", "train.epochs=1", *fast,
                    "loader.cache_dir=" + str(tmp_path / "cache"))  # fmt: skip
    run = run_local(cfg)
    assert isinstance(run.path, URLPath) and str(run.path) == f"{root}/url"
    assert [r["epoch"] for r in run.history()] == [0] and run.last_checkpoint.is_file()
    # Submitted again with more epochs: resumes from the bucket's last.pt, each epoch once.
    run = run_local(
        small_cfg("url", f"run_root={root}", f"data.store={store}", "train.epochs=2", *fast)
    )
    assert [r["epoch"] for r in run.history()] == [0, 1]
    assert [e["event"] for e in read_events(run)] == ["start", "resume"]
    assert cli.main(["evaluate", str(run.path), "--report-only"]) == 0
    assert RunDir(str(run.path)).report.is_file()
    out = f"{bucket}/preds"
    before = set(Path(tempfile.gettempdir()).glob("cellmorph-predict-*"))
    assert cli.main(["predict", "--checkpoint", str(run.best_checkpoint), "--store", store,
                     "--out", out]) == 0  # fmt: skip
    assert set(Path(tempfile.gettempdir()).glob("cellmorph-predict-*")) == before  # none left
    preds = pd.read_parquet(io.BytesIO(remote.read(f"{out}/predictions.parquet")))
    assert len(preds) == 48
    names = {k for k, _ in remote.list_objects(root)}
    assert {
        "url/config.yaml",
        "url/metrics.jsonl",
        "url/checkpoints/best.pt",
        "url/report.html",
    } <= names
    assert not any(k.endswith(".tmp") for k in names)
    text = "".join(remote.read(f"{root}/{k}").decode("latin-1") for k in names)
    assert TEST_SECRET not in text
    assert json.loads(remote.read(f"{root}/url/metrics.json"))["epoch"] in (0, 1)
