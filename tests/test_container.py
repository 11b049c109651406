"""The Docker image built and run (``make test-container``): docker/Dockerfile on a local base
made from Debian packages (docker/local_base.sh: Debian bookworm, a Python 3.11 venv with the
lock's CUDA torch from PyPI, its CUDA runtime wheels older than the lock's, like a production
base's), then the README's promises run inside it: the demo writing into a host folder, as the
image's user and as the host user (``--user``), ingest of a real SVS from a read-only /data,
fit from the store with workers, export, ``--ckpt_path last`` resume across two containers,
recipes by relative path, and a clear error where /dev/shm is too small.

Needs a running Docker engine, root (debootstrap) and ~15 GB of disk: ``make test-container``
sets SCRATCHPATH_CONTAINER_TESTS=1, and then a missing engine fails; elsewhere (``make test``)
these tests are skipped with that reason. Builds use host networking (pip reaches PyPI as the
host does); containers run without a network.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LOCK = dict(
    line.split("==", 1)
    for line in (REPO / "constraints.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
)
BASE = f"scratchpath-local-base:bookworm-torch{LOCK['torch']}"
IMAGE = "scratchpath-test:container"
IMAGE_USER = 10001  # docker/Dockerfile's useradd
# the host user of the --user form: ourselves, or (as root, as in CI) an ordinary uid
HOST_UID = os.getuid() or 4242
OTHER_UID = 4243  # a third user, who must still be able to read the outputs
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.+|cuda-.+)$")
SLIDE = "slides/CMU-1-Small-Region.svs"

if os.environ.get("SCRATCHPATH_CONTAINER_TESTS") != "1":
    pytest.skip(
        "container tests run with `make test-container` (a Docker engine, root, ~15 GB)",
        allow_module_level=True,
    )
pytestmark = pytest.mark.slow
_names = itertools.count()


def docker(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


def run(
    *command: str,
    image: str = IMAGE,
    user: str | None = None,
    mounts: dict[Path, str] | None = None,
    shm_size: str | None = None,
    entrypoint: str | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``docker run --rm --network none ... image command``; a container still running at the
    timeout is removed and the test fails (a hang is a failure, not a wait)."""
    name = f"scratchpath-test-{os.getpid()}-{next(_names)}"
    args = ["run", "--rm", "--network", "none", "--name", name]
    args += ["--user", user] if user else []
    args += ["--shm-size", shm_size] if shm_size else []
    args += ["--entrypoint", entrypoint] if entrypoint else []
    for host, target in (mounts or {}).items():
        args += ["-v", f"{host}:{target}"]
    try:
        return docker(*args, image, *command, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        docker("rm", "-f", name, check=False)
        pytest.fail(f"{' '.join(command)}: still running after {timeout} s")


def assert_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def engine() -> None:
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("no Docker engine answers `docker info` (start dockerd; see README, Docker)")


@pytest.fixture(scope="session")
def base(engine: None) -> str:
    """The local base image, made once per machine (it is kept between runs)."""
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        made = subprocess.run(
            [str(REPO / "docker" / "local_base.sh"), BASE], capture_output=True, text=True
        )
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-4000:]
    return BASE


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files as a clone would have them (plus uncommitted edits), so that a
    test can change src/ without touching the working tree."""
    folder = tmp_path_factory.mktemp("context")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for name in listed:
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


def build(context: Path, base: str, tag: str, *extra: str) -> float:
    """Seconds to build docker/Dockerfile from ``context`` on ``base``."""
    start = time.monotonic()
    docker(
        "build", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag,
        "-f", str(context / "docker" / "Dockerfile"), *extra, str(context), timeout=3600,
    )  # fmt: skip
    return time.monotonic() - start


@pytest.fixture(scope="session")
def image(base: str, context: Path) -> str:
    seconds = build(context, base, IMAGE)
    print(f"\nbuild: {seconds:.0f} s", file=sys.stderr)
    return IMAGE


def layers(tag: str) -> list[str]:
    return docker("image", "inspect", "-f", "{{json .RootFS.Layers}}", tag).stdout.split('"')[1::2]


def freeze(tag: str) -> dict[str, str]:
    out = assert_ok(run("-m", "pip", "list", "--format=freeze", image=tag, entrypoint="python"))
    pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pairs}


@pytest.fixture(scope="session")
def host_folder() -> Iterator[Path]:
    """Host folders mounted as /runs live here (traversable, so another uid can read them)."""
    root = Path(tempfile.mkdtemp(prefix="scratchpath-container-"))
    root.chmod(0o755)
    yield root
    # outputs of the image's user belong to uid 10001: remove them from inside a container
    run("-c", "rm -rf /runs/*", user="0:0", mounts={root: "/runs"}, entrypoint="sh")
    shutil.rmtree(root, ignore_errors=True)


def unreadable_by(uid: int, folder: Path) -> list[str]:
    """Paths under ``folder`` that ``uid`` cannot read (as root: asked by a process of that
    uid, ``find -readable`` uses access(2); otherwise we are the host user)."""
    as_uid = {"user": uid, "group": uid} if os.getuid() == 0 else {}
    found = subprocess.run(
        ["find", str(folder), "!", "-readable"], capture_output=True, text=True, **as_uid
    )
    assert found.returncode == 0, found.stderr
    return found.stdout.split()


def owners(folder: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_uid, p.stat().st_gid) for p in [folder, *folder.rglob("*")]}


# ---------------------------------------------------------------------------- the build


def test_install_keeps_the_base_torch_stack_and_the_lock_for_the_rest(
    image: str, base: str
) -> None:
    before, after = freeze(base), freeze(image)
    stack = {name for name in before if TORCH_STACK.match(name)}
    assert "torch" in stack
    # the base was made with CUDA runtime wheels that are not the lock's: keeping them shows
    assert any(before[name] != LOCK.get(name) for name in stack), "base matches the lock"
    assert {name: after[name] for name in stack} == {name: before[name] for name in stack}
    lock = {re.sub(r"[-_.]+", "-", name).lower(): v for name, v in LOCK.items()}
    tools = {"pip", "setuptools", "wheel", "scratchpath"}
    unlocked = {n: v for n, v in after.items() if n not in stack | tools and lock.get(n) != v}
    assert not unlocked, f"not the lock's versions: {unlocked}"


def test_a_change_in_src_rebuilds_only_the_package_layers(
    image: str, base: str, context: Path, tmp_path: Path
) -> None:
    changed = tmp_path / "context"
    shutil.copytree(context, changed, symlinks=True)
    init = changed / "src" / "scratchpath" / "__init__.py"
    init.write_text(init.read_text() + "# a one-line change\n")
    seconds = build(changed, base, f"{IMAGE}-changed")
    print(f"\nrebuild after a one-line change in src/: {seconds:.0f} s", file=sys.stderr)
    build(context, base, f"{IMAGE}-deps", "--target", "deps")  # cached: the first build's
    deps, first, second = layers(f"{IMAGE}-deps"), layers(image), layers(f"{IMAGE}-changed")
    assert first[: len(deps)] == deps
    assert second[: len(deps)] == deps, "the dependency layers were rebuilt"
    assert second != first, "the change in src/ did not reach the image"
    docker("rmi", f"{IMAGE}-changed", f"{IMAGE}-deps")


def test_the_default_command_is_the_help(image: str) -> None:
    out = assert_ok(run())
    assert "usage: scratchpath" in out
    for command in ("ingest", "fit", "export", "eval", "demo"):
        assert command in out


# ---------------------------------------------------------------------------- the demo


def test_demo_as_the_image_user_leaves_outputs_the_host_user_can_read(
    image: str, host_folder: Path
) -> None:
    runs = host_folder / "image_user"
    runs.mkdir()
    runs.chmod(0o777)  # README: the image's user (uid 10001) needs a folder it may write to
    assert_ok(run("demo", "--quick", "--out", "/runs/demo", mounts={runs: "/runs"}))
    demo = runs / "demo"
    assert (demo / "model" / "model.safetensors").is_file()
    assert owners(demo) == {(IMAGE_USER, IMAGE_USER)}
    assert unreadable_by(HOST_UID, demo) == []
    assert unreadable_by(OTHER_UID, demo) == []


def test_demo_as_the_host_user_with_the_documented_user_flag(image: str, host_folder: Path) -> None:
    runs = host_folder / "host_user"
    runs.mkdir()
    if os.getuid() == 0:
        os.chown(runs, HOST_UID, HOST_UID)
    user = f"{HOST_UID}:{HOST_UID if os.getuid() == 0 else os.getgid()}"
    assert_ok(run("demo", "--quick", "--out", "/runs/demo", user=user, mounts={runs: "/runs"}))
    demo = runs / "demo"
    assert (demo / "model" / "model.safetensors").is_file()
    assert owners(demo) == {tuple(int(x) for x in user.split(":"))}


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def workdir(image: str, host_folder: Path, data_dir: Path) -> Path:
    """A host folder mounted as /runs, as the host user: the smoke recipe's stores made from
    read-only real data inside the container (runs/ in the working directory is /runs)."""
    runs = host_folder / "real_data"
    runs.mkdir()
    if os.getuid() == 0:
        os.chown(runs, HOST_UID, HOST_UID)
    mounts = {runs: "/runs", data_dir: "/data:ro"}
    lung = "/data/tiles/lc25000_lung_224"
    for command in (
        ["ingest", f"/data/{SLIDE}", "--out", "runs/store", "--no-progress"],
        ["import-tiles", lung, "--labels", f"{lung}/labels.csv", "--group-column",
         "lc25000clean_group_id", "--out", "runs/lc25000_store"],
    ):  # fmt: skip
        assert_ok(run(*command, user=f"{HOST_UID}:{HOST_UID}", mounts=mounts))
    return runs


def fit(
    workdir: Path, *args: str, shm_size: str | None = "1g", timeout: float = 900
) -> subprocess.CompletedProcess:
    """The smoke recipe, by its path relative to the image's working directory, on the store
    ingested from the SVS (``args`` may name another)."""
    recipe = ["--config", "recipes/smoke_dino.yaml", "--data.stores", "[runs/store]"]
    return run(
        "fit", *recipe, *args, user=f"{HOST_UID}:{HOST_UID}", mounts={workdir: "/runs"},
        shm_size=shm_size, timeout=timeout,
    )  # fmt: skip


def test_ingest_reads_a_real_svs_from_a_read_only_mount(workdir: Path, data_dir: Path) -> None:
    from scratchpath.store import PatchStore

    store = PatchStore(workdir / "store")
    assert len(store) > 0
    assert [Path(s["source"]).name for s in store.slides] == [Path(SLIDE).name]


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    """4 steps with 2 DataLoader workers (--shm-size given), then the export."""
    assert_ok(fit(workdir, "--trainer.max_steps", "4", "--data.num_workers", "2"))
    last = "runs/smoke_dino/checkpoints/last.ckpt"
    assert_ok(
        run("export", last, "--out", "runs/smoke_dino/export",
            user=f"{HOST_UID}:{HOST_UID}", mounts={workdir: "/runs"})
    )  # fmt: skip
    return workdir / "smoke_dino"


def test_fit_with_workers_then_export_from_the_store(trained: Path) -> None:
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert (trained / "export" / "model.safetensors").is_file()
    assert owners(trained) == {(HOST_UID, HOST_UID)}


def test_fit_resumes_with_ckpt_path_last_in_a_second_container(
    trained: Path, workdir: Path
) -> None:
    out = assert_ok(fit(workdir, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "Restoring states from the checkpoint" in out
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6


# Full-size multi-crop views (224 px global, 96 px local, as the GPU recipes) of the 740 lung
# tiles: 48 tiles of them are ~20 MB; 2 workers × prefetch 2 and the batch in use need ~99 MB of
# /dev/shm, Docker gives 64 MB. Without the check a worker fails to allocate and fit hangs.
# (32 px patches keep the ViT's step cheap on a CPU; padding lets it see the 48 px probe tiles.)
LARGE_BATCHES = ["--data.stores", "[runs/lc25000_store]",
                 "--data.views.init_args.global_size", "224",
                 "--data.views.init_args.local_size", "96",
                 "--model.init_args.backbone_kwargs", "{img_size: 224, patch_size: 32, depth: 4, "
                 "embed_dim: 96, num_heads: 3, dynamic_img_size: true, dynamic_img_pad: true}",
                 "--data.batch_size", "48", "--data.num_workers", "2", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", "runs/shm"]  # fmt: skip


def test_workers_without_shm_size_stop_with_one_error_line(workdir: Path) -> None:
    result = fit(workdir, *LARGE_BATCHES, shm_size=None, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: /dev/shm: 64 MiB free") and "--shm-size" in last, last
    assert "Bus error" not in result.stderr


def test_the_same_workers_train_with_shm_size(workdir: Path) -> None:
    assert_ok(fit(workdir, *LARGE_BATCHES, shm_size="1g"))
