"""``make gpu-check``: on one CUDA GPU, the CUDA tier and the GPU benchmarks as one table + JSON.

1. the CUDA tier, ``pytest -m cuda tests/test_cuda.py`` (its log and JUnit XML beside the JSON);
2. the race of pytorch/vision#9606 for information: how often torchvision's own CUDA decoder,
   called on the training stream, corrupts memory that queued kernels still read on this GPU,
   beside scratchpath's decode (which the tier asserts never does);
3. ``bench_input.gpu_measurements``: nvJPEG + device views tiles/s per recipe; images/s (source
   tiles) and MFU of ``dino_vits16`` (DINO ViT-S/16), ``mae_vitb16`` (MAE ViT-B/16) and
   ``dinov2_vits14`` (DINOv2 ViT-S/14), bf16, fed by <= 4 workers against a GPU-resident batch
   (goal: fed / resident >= 0.95);
4. ``bench_train.full_size_dinov2`` for DINOv2 ViT-S/14: the framework against a plain loop.

It runs with a plain ``python3`` holding torch (no virtualenv needed): ``make gpu-check
PYTHON=python3``; README "The GPU check" gives the lent GPU machine's exact call. Budget: 8
minutes on one H200 (an estimate per part is below; a part whose estimate no longer fits the
``--budget`` is reported as not run). Without CUDA it says so and exits 1: the tier is reported
as not run (skipped, with pytest's reason) and so are the benchmarks.

    python benchmarks/gpu_check.py [--out runs/gpu_check.json] [--budget 480]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Seconds each part is expected to take on one H200 (first CUDA use, model builds included):
# the tier ~150 (its slowest: five 30-step smoke fits with an online evaluation, ~15 s each),
# the race ~10, bench_input ~200 (store import ~20, decode + views ~10, six 25-step runs ~25 s
# each, FLOP counts ~10), bench_train ~40 (two 10-step runs of ViT-S/14 at batch 64 x 10 crops).
ESTIMATE = {"tier": 150, "race": 10, "input": 200, "train": 40}


def _data_root() -> Path:
    """``SCRATCHPATH_TEST_DATA``, else the carried subset ``.gpu-data``, else ``../shared/data``."""
    if "SCRATCHPATH_TEST_DATA" in os.environ:
        return Path(os.environ["SCRATCHPATH_TEST_DATA"])
    carried = ROOT / ".gpu-data"
    return carried if (carried / "README.md").is_file() else ROOT.parent / "shared" / "data"


def run_tier(out_dir: Path, timeout: float) -> dict:
    """The CUDA tier in a subprocess: counts, and each test's outcome (not run = skipped)."""
    xml_path, log_path = out_dir / "gpu_check_tests.xml", out_dir / "gpu_check_tests.log"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml_path}",
        "tests/test_cuda.py",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            status = None
    result: dict = {"status": status, "seconds": time.perf_counter() - started, "tests": {}}
    if status is None:
        result["error"] = f"timed out after {timeout:.0f} s (log: {log_path.name})"
    if xml_path.is_file():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = f"{case.get('name')}"
            outcome, reason = "passed", ""
            for kind in ("failure", "error", "skipped"):
                element = case.find(kind)
                if element is not None:
                    outcome = {"skipped": "not run"}.get(kind, "failed")
                    reason = (element.get("message") or "").splitlines()[0][:200]
            result["tests"][name] = {
                "outcome": outcome,
                "reason": reason,
                "seconds": float(case.get("time") or 0),
            }
    counts = [t["outcome"] for t in result["tests"].values()]
    result["counts"] = {k: counts.count(k) for k in ("passed", "failed", "not run")}
    return result


def run_race(store) -> dict:
    """Corrupted iterations of the #9606 harness (tests/test_cuda.py) per decoder and layout."""
    import torch
    from torchvision.io import decode_jpeg

    sys.path.insert(0, str(ROOT / "tests"))
    from scratchpath.data.decode import EncodedTiles
    from scratchpath.store.codecs import TileCodec
    from test_cuda import ITERATIONS, VICTIMS, queued_reductions_corrupted

    tiles = store.read(range(VICTIMS))
    out: dict = {"iterations": ITERATIONS}
    for subsampling in ("444", "420"):
        codec = TileCodec("jpeg", 90, store.tile_size, subsampling)
        blobs = [codec.encode(tile) for tile in tiles]
        encoded = EncodedTiles.from_blobs(blobs).pin_memory()
        parts = encoded.parts()
        out[f"scratchpath_{subsampling}"] = queued_reductions_corrupted(
            lambda encoded=encoded: encoded.decode("cuda")
        )
        out[f"torchvision_{subsampling}"] = queued_reductions_corrupted(
            lambda parts=parts: decode_jpeg(parts, device="cuda")
        )
        torch.cuda.synchronize()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.json")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ["SCRATCHPATH_TEST_DATA"] = str(_data_root())
    args.out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    report: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "data": os.environ["SCRATCHPATH_TEST_DATA"],
        "not_run": {},
    }
    for package in ("torchvision", "torchcodec", "lightning", "timm"):
        try:
            report[package] = __import__(package).__version__
        except ImportError as err:
            report[package] = f"missing ({err})"

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    def fits(part: str) -> bool:
        if not report["cuda"]:
            report["not_run"][part] = "no CUDA device"
            return False
        if left() < ESTIMATE[part]:
            report["not_run"][part] = (
                f"time budget: {left():.0f} s left, ~{ESTIMATE[part]} s needed"
            )
            return False
        return True

    print(
        f"gpu-check: the CUDA tier ({'CUDA' if report['cuda'] else 'no CUDA device'})", flush=True
    )
    report["tier"] = run_tier(args.out.parent, timeout=max(60.0, left() - 60))
    if not report["cuda"]:
        for part in ("race", "input", "train"):
            fits(part)  # records each as not run
    else:
        report["gpu"] = torch.cuda.get_device_name()
        with tempfile.TemporaryDirectory() as tmp:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import bench_input  # (sets one thread per library, as its workers run)
            import bench_train
            from scratchpath.store import PatchStore

            store_path = bench_input.make_store(Path(tmp), bench_input.GPU_TILES)
            store = PatchStore(store_path)
            if fits("race"):
                report["race"] = run_race(store)
            if fits("input"):
                report["input"] = bench_input.gpu_measurements(store_path, store)
            if fits("train"):
                train_args = bench_train.parse_args(["--objectives", "dinov2"])
                tiles = bench_train.load_tiles(_data_root(), 64, train_args.image_size)
                report["train"] = bench_train.full_size_dinov2(
                    tiles,
                    train_args,
                    train_args.peak_tflops,
                    {"ViT-S/14": bench_train.DINOV2_FULL["ViT-S/14"]},
                )
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_table(report, args.out)
    tier_ok = report["tier"]["status"] == 0 and report["tier"]["counts"]["failed"] == 0
    return 0 if report["cuda"] and tier_ok and not report["not_run"] else 1


def print_table(report: dict, out: Path) -> None:
    """The one table the check prints (its JSON has everything)."""
    tier = report["tier"]
    c = tier["counts"]
    print(
        f"\n=== gpu-check: {report.get('gpu', 'no CUDA device')}, torch {report['torch']}, "
        f"torchcodec {report['torchcodec']}, torchvision {report['torchvision']}, "
        f"{report['seconds'] / 60:.1f} min ==="
    )
    print(
        f"CUDA tier: {c['passed']} passed, {c['failed']} failed, {c['not run']} not run"
        + (f" ({tier['error']})" if "error" in tier else "")
    )
    reasons = {t["reason"] for t in tier["tests"].values() if t["outcome"] == "not run"}
    for name, test in tier["tests"].items():
        if test["outcome"] == "failed" or (test["outcome"] == "not run" and len(reasons) > 1):
            print(f"  {test['outcome']}: {name}: {test['reason']}")
    if len(reasons) == 1:
        print(f"  not run: {c['not run']} tests: {reasons.pop()}")
    if "race" in report:
        r = report["race"]
        print(
            f"decode race (pytorch/vision#9606, {r['iterations']} iterations, corrupted): "
            f"scratchpath {r['scratchpath_444']} (4:4:4) / {r['scratchpath_420']} (4:2:0); "
            f"torchvision on the training stream {r['torchvision_444']} / "
            f"{r['torchvision_420']}"
        )
    if "input" in report:
        inp = report["input"]
        print(
            f"{'recipe':<16} {'decode+views':>13} {'fed img/s':>10} {'resident':>9} "
            f"{'fed/res':>8} {'MFU fed':>8} {'MFU res':>8}   (bf16, goal fed/res >= 0.95)"
        )
        for recipe in sorted(set(inp["decode_views"]) | set(inp["train"])):
            rate = inp["decode_views"].get(recipe)
            row = f"{recipe:<16} {f'{rate:,.0f} t/s' if rate else '-':>13}"
            t = inp["train"].get(recipe)
            if t:
                row += (
                    f" {t['fed_img_s']:>10,.0f} {t['resident_img_s']:>9,.0f} "
                    f"{t['fed_over_resident']:>8.3f} {t['mfu_fed']:>8.3f} "
                    f"{t['mfu_resident']:>8.3f}"
                )
            print(row)
    for label, t in report.get("train", {}).items():
        print(
            f"DINOv2 {label} full size (bench_train, batch {t['batch']} x 10 crops): framework "
            f"{t['framework_img_s']:,.0f} img/s (all crops), plain loop "
            f"{t['plain_img_s']:,.0f}: ratio {t['framework_over_plain']:.3f}, "
            f"MFU {t['mfu']:.3f}"
        )
    for part, why in report["not_run"].items():
        print(f"not run: {part}: {why}")
    print(f"written: {out}")


if __name__ == "__main__":
    sys.exit(main())
