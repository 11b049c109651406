"""Every shipped recipe parses; cluster recipes keep their hardware promises; launch scripts."""

from __future__ import annotations

import re
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
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vits14",
    "mae_vitb16",
    "mae_vits16",
    "mocov3_vitb16",
    "mocov3_vits16",
    "simclr_resnet50",
]
SMOKE = ["smoke_dino", "smoke_dinov2", "smoke_mae", "smoke_mocov3", "smoke_simclr"]
DINOV2 = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"]


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


@pytest.fixture(scope="module")
def objectives_with_batchnorm() -> set[str]:
    """Class paths of the objectives whose modules contain BatchNorm (tiny instances)."""
    from torch import nn

    tiny = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "depth": 1}}
    small = {
        "simclr": {"proj_hidden_dim": 8},
        "mocov3": {"proj_hidden_dim": 8},
        "dino": {"out_dim": 8, "hidden_dim": 8, "bottleneck_dim": 8},
        "dinov2": {"out_dim": 8, "hidden_dim": 8, "bottleneck_dim": 8},
        "mae": {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 1},
    }
    found = set()
    for name, cls in OBJECTIVES.items():
        module = cls(**tiny, **small[name])
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            found.add(class_path(cls))
    return found


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_recipe_synchronises_batchnorm_when_the_model_has_it(
    name: str, capsys: pytest.CaptureFixture[str], objectives_with_batchnorm: set[str]
) -> None:
    """Per-GPU BatchNorm statistics would make positives share a GPU's statistics (MoCo v3's
    8 head BN layers, SimCLR's ResNet and projector): every BN model syncs, no other does."""
    config = _resolved(f"{name}.yaml", capsys, "--data.stores", "[/data/store]")
    has_batchnorm = config["model"]["class_path"] in objectives_with_batchnorm
    assert config["trainer"]["sync_batchnorm"] is has_batchnorm


@pytest.mark.parametrize("name", DINOV2)
def test_dinov2_recipes_carry_the_published_pathology_settings(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _resolved(f"{name}.yaml", capsys, "--data.stores", "[/data/store]")
    model, views = (
        config["model"]["init_args"],
        config["data"]["init_args"] if "init_args" in config["data"] else config["data"],
    )
    views = views["views"]["init_args"]
    assert model["backbone"].endswith("_patch14_reg4_dinov2")
    assert (model["kde_weight"], model["koleo_weight"]) == (0.05, 0.0)  # Midnight: KDE, no KoLeo
    assert model["centering"] == "sinkhorn_knopp"
    assert (model["mask_probability"], model["mask_ratio"][0]) == (0.5, 0.1)
    assert (model["warmup_teacher_temp"], model["teacher_temp"]) == (0.04, 0.07)
    assert (views["hed_strength"], views["stain_p"]) == (0.05, 0.5)  # HED ±0.05 at p = 0.5
    assert views["local_size"] % 14 == 0 and views["global_size"] % 14 == 0  # whole patches
    assert config["trainer"]["limit_train_batches"] == 1250  # DINOv2's epoch
    per_gpu, gpus = config["data"]["batch_size"], config["trainer"]["devices"]
    assert model["lr_reference_batch"] == per_gpu * gpus  # the LR is given for the real batch
    if name == "dinov2_vitl14":
        assert model["out_dim"] == model["ibot_out_dim"] == 131072 and model["ibot_separate_head"]
        # OpenMidnight: base LR 2e-4 with sqrt(B / 1024) scaling (3.5e-4 collapsed)
        assert model["lr"] == pytest.approx(
            2e-4 * (model["lr_reference_batch"] / 1024) ** 0.5, rel=1e-3
        )
    head = (RECIPES / f"{name}.yaml").read_text().split("\nseed_everything")[0]
    header = " ".join(line.lstrip("# ") for line in head.splitlines())
    for promise in ("Sources:", "Hardware:", "Designed for:", "8 x H100", "per GPU x 8 ="):
        assert promise in header
    assert re.search(r"about [\d.]+ h", header), "hours the recipe was designed for"


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
