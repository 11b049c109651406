"""Every shipped recipe parses; cluster recipes keep their hardware promises; launch scripts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scratchpath.cli.fit import class_path, run_fit
from scratchpath.objectives import OBJECTIVES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml"))
CLUSTER = [
    "dino_vitb16",
    "dino_vits16",
    "mae_vitb16",
    "mae_vits16",
    "mocov3_vitb16",
    "mocov3_vits16",
    "simclr_resnet50",
]
SMOKE = ["smoke_dino", "smoke_mae", "smoke_mocov3", "smoke_simclr"]


def _resolved(recipe: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert run_fit(["--config", str(RECIPES / recipe), *extra, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_documented_recipes_exist() -> None:
    assert {f"{n}.yaml" for n in CLUSTER + SMOKE} <= set(ALL_RECIPES)


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_recipe_parses(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _resolved(recipe, capsys)
    assert config["model"]["class_path"] in {class_path(c) for c in OBJECTIVES.values()}
    assert config["data"]["views"]["class_path"].startswith("scratchpath.views.")


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_recipe_starts_with_a_header_comment(recipe: str) -> None:
    lines = (RECIPES / recipe).read_text().splitlines()
    first_field = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    header = "\n".join(lines[:first_field])
    assert first_field >= 5, "header comment: what, hardware, how to run, fields to change"
    assert "scratchpath fit --config recipes/" in header


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_recipe_is_8_gpu_bf16_ddp(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _resolved(f"{name}.yaml", capsys, "--data.stores", "[/data/store]")["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["strategy"]) == ("gpu", 8, "ddp")
    assert trainer["precision"] == "bf16-mixed"
    assert trainer["sync_batchnorm"] is name.startswith("simclr_resnet")  # BN only in the ResNet


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_recipe_takes_stores_from_the_environment(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCHPATH_FIT_DATA__STORES", "[/data/a, /data/b]")
    assert _resolved(f"{name}.yaml", capsys)["data"]["stores"] == ["/data/a", "/data/b"]


def test_cluster_recipe_without_stores_fails_in_one_line(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchpath.cli import main

    monkeypatch.delenv("SCRATCHPATH_FIT_DATA__STORES", raising=False)
    assert main(["fit", "--config", str(RECIPES / "dino_vits16.yaml")]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "data.stores" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("script", ["slurm_train.sbatch", "torchrun_multinode.sh"])
def test_launch_script_is_valid_bash_running_scratchpath_fit(script: str) -> None:
    path = RECIPES / script
    subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "scratchpath fit" in text and "--config" in text
    assert text.splitlines()[1].startswith("# ")  # header comment after the shebang


def test_slurm_script_requeues_on_sigusr1() -> None:
    text = (RECIPES / "slurm_train.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    assert "srun" in text
