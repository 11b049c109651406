"""Patch stores on object storage for real: a store written locally, uploaded the way the README
says to an S3 API on localhost (moto's server, IAM authentication on), read through the real
s3fs client: tile for tile equal, one ranged request per shard a batch touches (counted in the
server's own request log), training with DataLoader workers under the fork, spawn and forkserver
start methods, and one-line errors for a missing bucket, wrong credentials and a missing store.

The server is started by the module fixture (``tests/s3_helpers.py``). Without moto or s3fs
the tests are skipped, saying why; in CI (``CI`` set) that fails the run instead.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from s3_helpers import S3Server, require_s3_test_tools, start_s3_server
from scratchpath.store import PatchStore, import_tiles

REPO = Path(__file__).resolve().parents[1]
BUCKET = "scratchpath-tests"
SHARD_SIZE = 16  # 240 tiles -> 15 shards: a batch touches several


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on localhost with one bucket; this process's AWS clients point at it."""
    require_s3_test_tools()
    import boto3
    import s3fs

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server.env().items():
                patch.setenv(name, value)
            boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
            yield server
            s3fs.S3FileSystem.clear_instance_cache()  # no client of this server outlives it
    finally:
        server.stop()


@pytest.fixture(scope="module")
def uploaded(
    s3: S3Server, tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """The 240 DeepTexture tiles (64 px) as a local store, uploaded as the README says."""
    local = tmp_path_factory.mktemp("local") / "smoke_store"
    source = tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled"
    import_tiles(source, local, tile_size=64, shard_size=SHARD_SIZE)
    url = f"s3://{BUCKET}/stores/smoke_store"
    import fsspec  # the README's upload, word for word

    fsspec.filesystem("s3").put(f"{local}/", f"{url}/", recursive=True)
    return local, url


def test_uploaded_store_reads_back_tile_for_tile_equal_to_the_local_one(
    uploaded: tuple[Path, str],
) -> None:
    local, url = uploaded
    mine, theirs = PatchStore(local), PatchStore(url)
    assert len(theirs) == len(mine) == 240
    assert theirs.fingerprint == mine.fingerprint
    every = np.arange(len(mine))
    assert np.array_equal(theirs.read(every), mine.read(every))
    order = np.random.default_rng(0).permutation(len(mine))[:50]
    assert theirs.read_encoded_batch(order) == mine.read_encoded_batch(order)
    for column in ("slide_index", "x", "y", "mpp", "tissue_fraction"):
        assert np.array_equal(theirs.tile_column(column), mine.tile_column(column), equal_nan=True)


def _shard_gets(requests: list[tuple[str, str, int]]) -> list[str]:
    return [path for method, path, status in requests if method == "GET" and "/tiles/c/" in path]


def test_a_batch_costs_one_ranged_request_per_shard_it_touches(
    s3: S3Server, uploaded: tuple[Path, str]
) -> None:
    """The README's claim, counted on the server: the first batch reads each touched shard's
    index once (a suffix range) plus one range per shard; later batches one range per shard."""
    store = PatchStore(uploaded[1])
    first = [0, 1, 5, 17, 40, 41, 42, 200]  # shards 0, 1, 2, 12
    before = len(s3.requests())
    store.read_encoded_batch(first)
    got = s3.requests_after(before)
    assert all(status == 206 for _, _, status in got), got  # ranged (partial content) only
    shards = sorted({f"/{BUCKET}/stores/smoke_store/tiles/c/{s}/0/0/0" for s in (0, 1, 2, 12)})
    assert sorted(_shard_gets(got)) == sorted(shards * 2) and len(got) == 8

    before = len(s3.requests())
    store.read_encoded_batch([2, 3, 4, 18, 43, 201, 202])  # the same four shards
    got = s3.requests_after(before)
    assert sorted(_shard_gets(got)) == shards and len(got) == 4


def _read_in_child(store: PatchStore, indices: list[int], queue: multiprocessing.Queue) -> None:
    try:
        queue.put(store.read_encoded_batch(indices))
    except Exception as err:  # reported to the parent, which asserts on it
        queue.put(f"{type(err).__name__}: {err}")


def test_a_forked_child_reads_the_remote_store_its_parent_opened(
    uploaded: tuple[Path, str],
) -> None:
    """What a forked DataLoader worker does: s3fs refuses to run in a forked child, so the store
    must make the child its own filesystem."""
    store = PatchStore(uploaded[1])
    expected = store.read_encoded_batch([3, 30, 230])  # the parent's s3fs client is live
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(store, [3, 30, 230], queue))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert got == expected


# Runs `scratchpath fit` with this multiprocessing start method set first.
_FIT_WITH_START_METHOD = (
    "import sys, torch.multiprocessing as mp; mp.set_start_method(sys.argv[1]); "
    "from scratchpath.cli import main; sys.exit(main(sys.argv[2:]))"
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_training_reads_the_s3_store_in_two_workers(
    s3: S3Server, uploaded: tuple[Path, str], tmp_path: Path, method: str
) -> None:
    url = uploaded[1]
    before = len(s3.requests())
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _FIT_WITH_START_METHOD,
            method,
            "fit",
            "--config",
            str(REPO / "recipes" / "smoke_simclr.yaml"),
            "--trainer.callbacks=[]",  # no online evaluation (its stores are local)
            "--data.stores",
            f"[{url}]",
            "--data.num_workers",
            "2",
            "--data.batch_size",
            "16",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        env={**os.environ, **s3.env()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["scratchpath"]["data"]["stores"][0]["path"] == url
    # The workers read the tiles: ranged GETs of shards reached the server during the run.
    assert _shard_gets(s3.requests()[before:])


def _info(url: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchpath", "info", url],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("where", "credentials", "reason"),
    [
        (
            "s3://scratchpath-no-bucket/stores/x",
            {},
            "bucket 'scratchpath-no-bucket' does not exist",
        ),
        (f"s3://{BUCKET}/stores/smoke_store", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
        (f"s3://{BUCKET}/stores/no_such_store", {}, "nothing at this path"),
    ],
    ids=["missing-bucket", "wrong-credentials", "missing-store"],
)
def test_bad_location_or_credentials_give_one_line(
    s3: S3Server, uploaded: tuple[Path, str], where: str, credentials: dict, reason: str
) -> None:
    result = _info(where, **s3.env(**credentials))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: "), result.stderr
    assert reason in lines[0]
