#!/usr/bin/env bash
# `make gpu-wheels`: what `make gpu-check` needs on the lent GPU machine, which reaches no package
# registry and runs its own python3 (3.12: torch, torchvision, lightning, timm, numpy, opencv,
# scipy, scikit-learn, matplotlib, tifffile, h5py, PyYAML, pytest, pytest-timeout, ... are there):
#   .whl/       cp312 manylinux x86_64 wheels of the packages it lacks, at the versions pinned in
#               constraints.txt, installed there with
#               pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   .gpu-data/  a subset of the real tiles of $SCRATCHPATH_TEST_DATA (default ../shared/data):
#               the tests and benchmarks need real tiles, and ../shared does not travel
# Both are ignored by git (.gitignore). The device tool sends the working tree plus carried paths,
# at most 64 MiB in all: the last line prints that total.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DATA="${SCRATCHPATH_TEST_DATA:-../shared/data}"
# Missing from the GPU image (/work/.library/device/KINDS.md lists what it holds), with the
# packages they need that it lacks too: zarr (numcodecs, donfig; google-crc32c for our shard
# indexes), albumentations (albucore: simsimd, stringzilla; pydantic: pydantic-core,
# annotated-types, typing-inspection, a newer typing-extensions), jsonargparse[signatures]
# (docstring-parser, typeshed-client), imagecodecs, torchcodec.
PACKAGES="zarr numcodecs donfig google-crc32c albumentations albucore pydantic pydantic-core
annotated-types typing-inspection typing-extensions simsimd stringzilla jsonargparse
docstring-parser typeshed-client imagecodecs torchcodec"

pins=$("$PYTHON" - $PACKAGES <<'PY'
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in open("constraints.txt"):
    name, _, version = line.strip().partition("==")
    if version and not line.startswith("#"):
        pins[norm(name)] = version
missing = [p for p in sys.argv[1:] if norm(p) not in pins]
if missing:
    sys.exit(f"gpu_wheels: not pinned in constraints.txt: {' '.join(missing)}")
print(" ".join(f"{p}=={pins[norm(p)]}" for p in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir .whl
for pin in $pins; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$pin"
done

# Real tiles: 40 per class of LC25000 lung (with their labels) and 96 DeepTexture tiles.
rm -rf .gpu-data
"$PYTHON" - "$DATA" <<'PY'
import csv, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(".gpu-data")
if not (src / "README.md").is_file():
    sys.exit(f"gpu_wheels: no real data at {src}; set SCRATCHPATH_TEST_DATA")
dst.mkdir()
shutil.copy(src / "README.md", dst)
lc = Path("tiles/lc25000_lung_224")
with open(src / lc / "labels.csv", newline="") as file:
    rows = list(csv.DictReader(file))
keep = [r for label in sorted({r["label"] for r in rows})
        for r in [r for r in rows if r["label"] == label][:40]]
for r in keep:
    (dst / lc / r["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / lc / r["path"], dst / lc / r["path"])
with open(dst / lc / "labels.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(keep)
dt = Path("tiles/deeptexture_examples_unlabeled_256")
(dst / dt / "unlabeled").mkdir(parents=True)
for name in ("SOURCE.md",):
    shutil.copy(src / dt / name, dst / dt / name)
shutil.copy(src / lc / "SOURCE.md", dst / lc / "SOURCE.md")
for f in sorted((src / dt / "unlabeled").iterdir())[:96]:
    shutil.copy(f, dst / dt / "unlabeled" / f.name)
PY

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
data=$(du -sb .gpu-data | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((wheels / 1048576)) MiB; .gpu-data $((data / 1048576)) MiB;" \
     "working tree $((tree / 1048576)) MiB; total $(((wheels + data + tree) / 1048576)) MiB of 64"
