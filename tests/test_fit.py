"""`scratchpath fit`: the smoke recipes train on real tiles, DDP, preemption + resume, errors."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from scratchpath.cli import main
from scratchpath.cli.fit import auto_precision, class_path, run_fit
from scratchpath.objectives import OBJECTIVES
from scratchpath.store import import_tiles

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SMOKE = ["smoke_simclr", "smoke_mocov3", "smoke_dino", "smoke_dinov2", "smoke_mae"]
# RankMe of the DINOv2 smoke run's teacher after SMOKE_STEPS steps must stay above this: the
# untrained network scores about 13 on these tiles, a collapsed one 1-2.
DINOV2_RANKME_FLOOR = 8.0
SMOKE_STEPS = 16


@pytest.fixture(scope="module")
def stores(tiles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The smoke recipes' two stores from real tiles, at 64 px to keep CPU steps cheap:
    the 240 unlabelled DeepTexture tiles and 40 tiles per class of LC25000 lung."""
    root = tmp_path_factory.mktemp("stores")
    unlabelled = tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled"
    import_tiles(unlabelled, root / "smoke_store", tile_size=64)
    source = tiles_dir / "lc25000_lung_224"
    with open(source / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    subset = [
        r
        for label in ("lung_aca", "lung_n", "lung_scc")
        for r in [r for r in rows if r["label"] == label][:40]
    ]
    with open(root / "lc_labels.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    import_tiles(
        source,
        root / "lc25000_store",
        labels_csv=root / "lc_labels.csv",
        group_column="lc25000clean_group_id",
        tile_size=64,
    )
    return {"smoke_store": root / "smoke_store", "lc25000_store": root / "lc25000_store"}


def _workdir(folder: Path, stores: dict[str, Path]) -> Path:
    """A folder laid out like the repository root for the recipes: runs/<store> links."""
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for name, path in stores.items():
        (folder / "runs" / name).symlink_to(path)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(_workdir(tmp_path, stores))
    return tmp_path


@pytest.fixture(scope="module", params=SMOKE)
def smoke_run(
    request: pytest.FixtureRequest,
    stores: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Path]]:
    """Each smoke recipe trained for SMOKE_STEPS steps, logging every step."""
    name = request.param
    folder = _workdir(tmp_path_factory.mktemp(name), stores)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        status = run_fit(
            [
                "--config",
                str(RECIPES / f"{name}.yaml"),
                "--trainer.max_steps",
                str(SMOKE_STEPS),
                "--trainer.log_every_n_steps",
                "1",
            ]
        )
    assert status == 0
    yield name, folder / "runs" / name


def _metrics(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _losses(rows: list[dict[str, str]]) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def test_smoke_recipe_loss_goes_down(smoke_run: tuple[str, Path]) -> None:
    name, run_dir = smoke_run
    losses = [loss for _, loss in _losses(_metrics(run_dir))]
    assert len(losses) == SMOKE_STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"{name}: loss {losses}"


def test_smoke_recipe_logs_online_evaluation(smoke_run: tuple[str, Path]) -> None:
    name, run_dir = smoke_run
    rows = [r for r in _metrics(run_dir) if r.get("online/knn_acc")]
    assert [int(r["step"]) for r in rows] == [SMOKE_STEPS - 1]  # at the last step
    assert 0.0 <= float(rows[0]["online/knn_acc"]) <= 1.0
    assert float(rows[0]["online/rankme"]) > 1.0
    if name == "smoke_dinov2":
        assert float(rows[0]["online/rankme"]) > DINOV2_RANKME_FLOOR  # no collapse


def test_checkpoint_records_scratchpath_metadata_and_config(smoke_run: tuple[str, Path]) -> None:
    name, run_dir = smoke_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    record = checkpoint["scratchpath"]
    assert record["global_step"] == SMOKE_STEPS
    assert record["objective"] == name.removeprefix("smoke_")
    config = yaml.safe_load(record["config"])
    assert config["trainer"]["max_steps"] == SMOKE_STEPS  # the command-line override
    assert config["trainer"]["precision"] == "32-true"  # chosen for the CPU
    assert config["model"]["class_path"] == class_path(OBJECTIVES[record["objective"]])
    assert (run_dir / "logs" / "version_0" / "config.yaml").is_file()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_method_alias_resolves_to_objectives_entry(
    name: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_fit(
        [
            "--model",
            name,
            "--data.stores",
            "[runs/smoke_store]",
            "--data.views",
            "scratchpath.views.TwoViews",
            "--print_config",
        ]
    )
    assert status == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == class_path(OBJECTIVES[name])


def test_environment_variable_sets_field_the_recipe_leaves_out(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCHPATH_FIT_DATA__SHUFFLE_BUFFER", "123")  # not in the recipe
    assert run_fit(["--config", str(RECIPES / "smoke_mae.yaml"), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["shuffle_buffer"] == 123


def test_auto_precision_is_bf16_on_gpu_and_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_precision("auto") == "bf16-mixed"
    assert auto_precision("cpu") == "32-true"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model", "byol"], "error: model: unknown method 'byol'"),
        (["--model.backbone", "vit_nonexistent"], "error: model.backbone: unknown timm model"),
        (["--data.stores", "[runs/no_such_store]"], "error: data.stores: patch store not found"),
    ],
    ids=["unknown-method", "unknown-timm-model", "missing-store"],
)
def test_bad_config_fails_with_one_line_error(
    override: list[str], message: str, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status = main(["fit", "--config", str(RECIPES / "smoke_mae.yaml"), *override])
    err = capfd.readouterr().err.strip()
    assert status == 2
    assert err.startswith(message)
    assert len(err.splitlines()) == 1, err


def test_non_finite_loss_stops_naming_the_step(
    workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "fit",
            "--config",
            str(RECIPES / "smoke_mae.yaml"),
            "--model.lr",
            "1e30",
            "--model.warmup_epochs",
            "0",
            "--trainer.max_steps",
            "6",
        ]
    )
    err_lines = capfd.readouterr().err.strip().splitlines()
    assert status == 2
    assert err_lines[-1].startswith("error: step ")
    assert "Traceback" not in "\n".join(err_lines)


def _fit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "scratchpath", "fit", *args]


def test_ddp_two_cpu_processes_train_and_checkpoint(workdir: Path) -> None:
    result = subprocess.run(
        _fit_command(
            "--config",
            str(RECIPES / "smoke_simclr.yaml"),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.max_steps",
            "3",
            "--data.batch_size",
            "8",
        ),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(workdir / "runs/smoke_simclr/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert "global batch 16" in result.stderr  # 2 ranks x 8


# What srun sets for a one-task job: Lightning then detects SLURM (SLURMEnvironment).
FAKE_SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "scratchpath-fit",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


@pytest.mark.parametrize(
    ("signum", "environment"),
    [(signal.SIGTERM, {}), (signal.SIGUSR1, FAKE_SLURM)],
    ids=["sigterm", "sigusr1-under-slurm"],
)
def test_signal_saves_checkpoint_and_resume_continues_at_its_step(
    workdir: Path, signum: signal.Signals, environment: dict[str, str]
) -> None:
    """SIGUSR1 under SLURM is what `#SBATCH --signal=SIGUSR1@90` sends: with Lightning's
    auto-requeue left on, Lightning would take it (hpc_ckpt, scontrol) instead of scratchpath."""
    recipe = str(RECIPES / "smoke_mae.yaml")
    process = subprocess.Popen(
        _fit_command(
            "--config", recipe, "--trainer.max_steps", "1000", "--trainer.log_every_n_steps", "1"
        ),
        cwd=workdir,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **environment},
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        for line in process.stderr:  # the objective announces its first batch
            if "global batch" in line:
                break
        os.kill(process.pid, signum)
        stderr = process.stderr.read()
        status = process.wait()
    finally:
        watchdog.cancel()
    assert status == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert not list(workdir.rglob("hpc_ckpt_*.ckpt"))  # not Lightning's mid-step checkpoint
    last = workdir / "runs/smoke_mae/checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    stopped_at = checkpoint["global_step"]
    assert stopped_at >= 1
    # The data position of that step (7 batches of 32 per epoch), not one written again when
    # training ended, whose loops say the epoch is done.
    position = checkpoint["PatchDataModule"]
    assert (position["epoch"], position["batches_consumed"]) == divmod(stopped_at, 240 // 32)

    assert (
        run_fit(
            [
                "--config",
                recipe,
                "--ckpt_path",
                "last",
                "--trainer.log_every_n_steps",
                "1",
                "--trainer.max_steps",
                str(stopped_at + 2),
            ]
        )
        == 0
    )
    resumed = _losses(_metrics(workdir / "runs/smoke_mae", version=1))
    assert [step for step, _ in resumed] == [stopped_at, stopped_at + 1]
    assert torch.load(last, weights_only=True)["global_step"] == stopped_at + 2


def test_progress_lines_show_step_total_loss_rate_and_time_left(workdir: Path) -> None:
    stream = io.StringIO()
    argv = ["--config", str(RECIPES / "smoke_mae.yaml"), "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "2"]  # fmt: skip
    assert run_fit(argv, progress_stream=stream) == 0  # the recipe turns the bar off
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    for line in lines:
        fields = line.split("  ")
        assert fields[1].startswith("loss ") and float(fields[1].split()[1]) > 0
        assert fields[2].endswith(("steps/s", "s/step"))
        assert fields[3].startswith("elapsed ") and fields[4].startswith("left ")
    assert lines[-1].endswith("left 0:00")


def test_progress_line_format() -> None:
    from scratchpath.callbacks import ProgressLog

    log = ProgressLog()
    assert log.line(250, 1000, 1.23456, 125.0) == (
        "step 250/1000 (25%)  loss 1.2346  2.00 steps/s  elapsed 2:05  left 6:15"
    )
    assert log.line(3, None, None, 30.0) == "step 3  10.00 s/step  elapsed 0:30"
    assert log.line(10, 7200, 0.5, 3600.0).endswith(
        "360.00 s/step  elapsed 1:00:00  left 719:00:00"
    )


def test_ckpt_path_last_without_a_checkpoint_fails_naming_the_folder(
    workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Lightning only warns and trains from step 0; a requeued job that looks in the wrong
    folder must not silently start over."""
    status = main(["fit", "--config", str(RECIPES / "smoke_mae.yaml"), "--ckpt_path", "last"])
    err = capfd.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    folder = workdir / "runs" / "smoke_mae" / "checkpoints"
    assert err.startswith(f"error: --ckpt_path last: no last*.ckpt in {folder}; ")
    assert "last-or-fresh" in err
    assert not (workdir / "runs" / "smoke_mae" / "logs").exists()  # nothing trained


def test_ckpt_path_that_does_not_exist_fails_in_one_line(
    workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status = main(["fit", "--config", str(RECIPES / "smoke_mae.yaml"), "--ckpt_path", "x.ckpt"])
    err = capfd.readouterr().err.strip()
    assert status == 2 and err == "error: --ckpt_path: checkpoint not found: x.ckpt"


def test_ckpt_path_last_or_fresh_starts_fresh_then_resumes(
    workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--config",
        str(RECIPES / "smoke_mae.yaml"),
        "--ckpt_path",
        "last-or-fresh",
        "--trainer.log_every_n_steps",
        "1",
    ]
    assert run_fit([*argv, "--trainer.max_steps", "2"]) == 0
    folder = workdir / "runs" / "smoke_mae" / "checkpoints"
    assert f"no checkpoint in {folder}; starting fresh" in capfd.readouterr().err
    assert run_fit([*argv, "--trainer.max_steps", "3"]) == 0
    assert "starting fresh" not in capfd.readouterr().err
    resumed = _losses(_metrics(workdir / "runs" / "smoke_mae", version=1))
    assert [step for step, _ in resumed] == [2]  # continued at step 2, not from 0


def test_checkpoints_are_ranked_by_the_online_probe_or_kept_by_age_never_by_loss() -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from scratchpath.callbacks import OnlineEvaluation
    from scratchpath.cli.fit import default_model_checkpoint

    periodic = default_model_checkpoint("runs/x", None)
    assert (periodic.monitor, periodic.mode, periodic.save_top_k) == ("step", "max", 3)
    assert periodic.save_last and periodic._every_n_train_steps == 1000
    online = OnlineEvaluation.__new__(OnlineEvaluation)  # only its interval is read
    online.every_n_steps = 25
    best = default_model_checkpoint("runs/x", online)
    assert (best.monitor, best.mode, best.save_top_k) == ("online/knn_acc", "max", 1)
    assert isinstance(best, ModelCheckpoint) and best._every_n_train_steps == 25


def test_a_stop_signal_during_setup_is_kept_until_the_first_step(workdir: Path) -> None:
    """SLURM's --signal can come before training starts: the run must not die without a
    checkpoint (SIGUSR1's default action) but stop after its first step, saved."""
    process = subprocess.Popen(
        _fit_command(
            "--config",
            str(RECIPES / "smoke_mae.yaml"),
            "--ckpt_path",
            "last-or-fresh",
            "--trainer.max_steps",
            "1000",
        ),
        cwd=workdir,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **FAKE_SLURM},
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        for line in process.stderr:  # printed once the signal handlers are in place
            if "starting fresh" in line:
                break
        os.kill(process.pid, signal.SIGUSR1)
        stderr = process.stderr.read()
        status = process.wait()
    finally:
        watchdog.cancel()
    assert status == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "stopped by SIGUSR1 at step 1" in stderr
    last = workdir / "runs/smoke_mae/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 1


def test_main_remembers_stop_signals_from_its_start_and_restores_the_handlers() -> None:
    """`scratchpath fit` takes seconds to import torch: SIGUSR1 / SIGTERM must not kill it
    then (their default action) but reach the run, which stops after its first step."""
    from scratchpath.cli import _stop_signals_remembered

    before = signal.getsignal(signal.SIGUSR1)
    with _stop_signals_remembered() as received:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGUSR1, signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR1) is before
