"""The SLURM scripts of ``recipes/`` run for real on a one-node SLURM cluster on localhost
(``tests/slurm_helpers.py`` starts it), submitted with ``sbatch`` as the README says:

- ``slurm_ingest_array.sbatch`` as a 2-task array over the real SVS slides: two shard stores
  that open together with exactly the tiles of one plain ingest; a resubmitted task skips its
  finished slide;
- ``slurm_train.sbatch`` on the SimCLR smoke recipe on CPU with a 1-minute time limit, so that
  SLURM's own ``--signal=SIGUSR1@50`` comes mid-run: the job checkpoints, requeues itself and
  resumes until done, ending with the weights of an uninterrupted run; a ``scancel`` (SIGTERM)
  leaves a checkpoint that resumes.

Only sbatch options that size the job for this machine (nodes, tasks, CPUs, memory, GPUs,
time) and the variables the scripts document are given. Without ``slurmctld`` (Debian:
``apt-get install slurm-wlm munge``) the tests are skipped, saying why; in CI they fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scratchpath.cli import main
from scratchpath.store import PatchStore, import_tiles
from slurm_helpers import ENDED, LocalSlurm, require_slurm, start_local_slurm

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SLIDES = ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")
INGEST_OPTIONS = ["--mpp", "0.5", "--assume-mpp", "0.25", "--tile-size", "224"]
# The smoke job, on this machine: 1 task, 2 CPUs, no GPU, and a time limit of 1 minute with
# the warning 50 s before it (the script's own SIGUSR1@90 would come at once in a 1-minute job).
CPU_JOB = [
    "--nodes",
    "1",
    "--ntasks-per-node",
    "1",
    "--gpus-per-node",
    "0",
    "--cpus-per-task",
    "2",
    "--mem",
    "2G",
]
# SLURM signals 10-40 s after the job starts (--time 1, SIGUSR1@50, time limits checked every
# 30 s): the steps must take longer than that on any machine, so the SLURM jobs pace each step
# to at least 0.4 s (PACED): >= 60 s of steps after start-up.
TRAIN_STEPS = 150
PACED = "--trainer.callbacks=" + json.dumps(
    [{"class_path": "slurm_helpers.PacedSteps", "init_args": {"seconds": 0.4}}]
)
TRAIN_ARGS = [
    "--trainer.callbacks=[]",  # no online evaluation: the smoke recipe's needs a second store
    "--data.batch_size",
    "16",
    "--data.num_workers",
    "2",
    "--trainer.log_every_n_steps",
    "10",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    require_slurm()
    cluster = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def submit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder sbatch is called in, with the venv's commands first on PATH (as an activated
    environment would have them)."""
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    (tmp_path / "logs").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def smoke_store(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("stores") / "smoke_store"
    import_tiles(
        tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled", store, tile_size=64
    )
    return store


def _tiles_by_place(store: PatchStore) -> dict[tuple, bytes]:
    """Every tile's stored bytes keyed by (slide, x, y, µm/px)."""
    slide_ids = [store.slides[i]["slide_id"] for i in store.tile_column("slide_index").tolist()]
    places = zip(
        slide_ids,
        store.tile_column("x").tolist(),
        store.tile_column("y").tolist(),
        store.tile_column("mpp").tolist(),
        strict=True,
    )
    return dict(zip(places, store.read_encoded_batch(range(len(store))), strict=True))


@pytest.mark.slow
def test_ingest_array_shards_hold_the_tiles_of_one_plain_ingest(
    slurm: LocalSlurm, slides_dir: Path, submit_dir: Path
) -> None:
    listing = submit_dir / "slides.txt"
    listing.write_text("".join(f"{slides_dir / name}\n" for name in SLIDES))
    variables = {"SLIDES": str(listing), "STORE_ROOT": str(submit_dir / "stores")}
    script = str(RECIPES / "slurm_ingest_array.sbatch")
    sizing = ["--cpus-per-task", "1", "--mem", "1G", "--time", "10"]
    job = slurm.sbatch(
        "--array=0-1", *sizing, script, *INGEST_OPTIONS, cwd=submit_dir, env=variables
    )
    tasks = slurm.wait(job, timeout_s=600)
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], tasks

    plain = submit_dir / "plain"
    assert (
        main(
            [
                "ingest",
                *(str(slides_dir / n) for n in SLIDES),
                "--out",
                str(plain),
                *INGEST_OPTIONS,
                "--no-progress",
            ]
        )
        == 0
    )
    shards = [submit_dir / "stores" / f"shard_{i}" for i in (0, 1)]
    assert [len(PatchStore(s).slides) for s in shards] == [1, 1]  # one slide per task
    together, alone = _tiles_by_place(PatchStore(*shards)), _tiles_by_place(PatchStore(plain))
    assert len(PatchStore(*shards)) == len(PatchStore(plain)) == len(together) > 0
    assert together == alone  # the same tiles at the same places, byte for byte

    # Resubmitting task 1 skips its finished slide and leaves its shard as it was.
    before = PatchStore(shards[1]).fingerprint
    again = slurm.sbatch(
        "--array=1", *sizing, script, *INGEST_OPTIONS, cwd=submit_dir, env=variables
    )
    assert [t["JobState"] for t in slurm.wait(again, timeout_s=600)] == ["COMPLETED"]
    log = (submit_dir / "logs" / f"ingest_{again}_1.out").read_text()
    assert "0 slide(s) ingested" in log and "1 already in the store" in log, log
    assert PatchStore(shards[1]).fingerprint == before


def _weights(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
    return checkpoint["state_dict"], checkpoint["global_step"]


def _train_job(
    slurm: LocalSlurm, submit_dir: Path, smoke_store: Path, *sbatch_args: str, steps: int
) -> int:
    tests_dir = str(Path(__file__).parent)  # the jobs import slurm_helpers.PacedSteps
    python_path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    variables = {
        "RECIPE": str(RECIPES / "smoke_simclr.yaml"),
        "STORES": f"[{smoke_store}]",
        "PYTHONPATH": python_path,
    }
    return slurm.sbatch(
        *CPU_JOB,
        *sbatch_args,
        str(RECIPES / "slurm_train.sbatch"),
        *TRAIN_ARGS,
        PACED,
        "--trainer.max_steps",
        str(steps),
        cwd=submit_dir,
        env=variables,
    )


def _fit_outside_slurm(
    submit_dir: Path, smoke_store: Path, root_dir: str, steps: int, *extra: str, timeout_s: int
) -> subprocess.CompletedProcess:
    """The jobs' smoke fit (unpaced) as a plain process in ``submit_dir``, without SLURM."""
    return subprocess.run(
        [
            sys.executable, "-m", "scratchpath", "fit",
            "--config", str(RECIPES / "smoke_simclr.yaml"),
            "--data.stores", f"[{smoke_store}]",
            "--trainer.default_root_dir", root_dir,
            *TRAIN_ARGS,
            "--trainer.max_steps", str(steps),
            *extra,
        ],
        cwd=submit_dir, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~3 min on 2 idle cores; a loaded machine needs many more
def test_train_job_checkpoints_on_the_time_limit_signal_requeues_and_ends_as_one_run(
    slurm: LocalSlurm, submit_dir: Path, smoke_store: Path
) -> None:
    job = _train_job(
        slurm, submit_dir, smoke_store, "--time", "1", "--signal", "SIGUSR1@50", steps=TRAIN_STEPS
    )
    # Once the job has requeued itself, give the requeued run time to finish: one resume is what
    # is tested, and a loaded machine would otherwise need many 1-minute runs.
    deadline = time.monotonic() + 900
    while int(slurm.jobs(job)[0].get("Restarts", 0)) < 1:
        assert slurm.jobs(job)[0]["JobState"] not in ENDED, "the job ended without a requeue"
        assert time.monotonic() < deadline, "no requeue within 15 minutes"
        time.sleep(0.5)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")
    (record,) = slurm.wait(job, timeout_s=1200)
    output = (submit_dir / f"slurm-scratchpath-fit-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", output[-3000:]
    assert record["Restarts"] == "1", output[-3000:]  # it requeued itself once
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 at step (\d+)", output)]
    assert len(stops) == int(record["Restarts"]) and 0 < stops[0] < TRAIN_STEPS, output[-3000:]
    assert "--ckpt_path last-or-fresh" in output and "run 1: " in output  # then strict `last`
    run_dir = submit_dir / "runs" / "smoke_simclr"  # absolute, from SLURM_SUBMIT_DIR
    resumed, step = _weights(run_dir / "checkpoints" / "last.ckpt")
    assert step == TRAIN_STEPS

    # The same steps in one uninterrupted run, outside SLURM.
    reference = _fit_outside_slurm(
        submit_dir, smoke_store, "runs/reference", TRAIN_STEPS, timeout_s=1200
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    uninterrupted, step = _weights(submit_dir / "runs/reference/checkpoints/last.ckpt")
    assert step == TRAIN_STEPS and resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scancel_leaves_a_checkpoint_that_resumes(
    slurm: LocalSlurm, submit_dir: Path, smoke_store: Path
) -> None:
    job = _train_job(slurm, submit_dir, smoke_store, "--time", "30", steps=100_000)
    output_file = submit_dir / f"slurm-scratchpath-fit-{job}.out"
    deadline = time.monotonic() + 900
    while not re.search(
        r"^step \d+/", output_file.read_text() if output_file.exists() else "", re.M
    ):
        assert time.monotonic() < deadline, "the job printed no progress line in 15 minutes"
        time.sleep(1)
    slurm.run("scancel", str(job))
    (record,) = slurm.wait(job, timeout_s=120)
    output = output_file.read_text()
    assert record["JobState"] == "CANCELLED", output[-3000:]
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", output)
    assert len(stopped) == 1, output[-3000:]  # it saved and stopped (not killed mid-step)
    last = submit_dir / "runs" / "smoke_simclr" / "checkpoints" / "last.ckpt"
    _, stopped_at = _weights(last)
    assert stopped_at == int(stopped[0]) >= 1

    resumed = _fit_outside_slurm(
        submit_dir, smoke_store, "runs/smoke_simclr", stopped_at + 2, "--ckpt_path", "last",
        timeout_s=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _weights(last)[1] == stopped_at + 2
