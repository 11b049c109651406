"""``scratchpath demo``: the whole pipeline on a fresh machine, synthetic slides to evaluation.

synthetic (or your) slides -> ingest -> labelled tiles -> augmentation preview -> pretrain
(``recipes/demo.yaml``) -> export -> kNN / linear probe against a random-init backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scratchpath.errors import ScratchpathError

DESCRIPTION = """\
Run the whole scratchpath pipeline once, on CPU, with nothing to download:

  1. write synthetic H&E slides (pyramidal OME-TIFF; or use yours with --slides DIR)
  2. write a labelled synthetic tile set (tumour, stroma, glandular, adipose)
  3. ingest the slides into a patch store (tissue detection, tiles at 1 µm/px)
  4. import the labelled tiles into a second store
  5. draw the augmented views the recipe trains on (scratchpath preview)
  6. pretrain a tiny ViT with DINO (recipes/demo.yaml)
  7. export the backbone (model.safetensors + config.json)
  8. evaluate it by kNN and linear probe next to the same ViT randomly initialised and a
     colour-histogram baseline (grouped train/test split)
  9. slide level: a synthetic cohort (a slide is "tumour" when it holds a small tumour focus)
     embedded tile by tile and classified by ABMIL next to mean pooling, in one command
     (scratchpath eval --slides): one table, one attention heatmap

Each step prints one line (pretraining also a progress line every few steps: step / total,
loss, rate, time left); training output goes to OUT/logs/fit.log. A second run into the same
folder reuses the slides, tiles and stores and trains again. Default: a few minutes on 2 cores;
--quick: a smaller version (under a minute) that checks the installation.
"""

# Demo sizes: (slides, slide px, labelled tiles per class, pretraining steps, batch, probe
# epochs; slide-level cohort: slides, px at 1 µm/px, tumour focus radius µm, repeats, epochs)
DEFAULT = {"slides": 4, "size": (4096, 3072), "per_class": 80, "steps": None, "batch": None,
           "linear_epochs": 100, "cohort": 16, "cohort_size": 768, "focus_um": 100.0,
           "mil_repeats": 3, "mil_epochs": 40}  # fmt: skip
QUICK = {"slides": 2, "size": (1536, 1536), "per_class": 16, "steps": 4, "batch": 16,
         "linear_epochs": 10, "cohort": 12, "cohort_size": 512, "focus_um": 80.0,
         "mil_repeats": 1, "mil_epochs": 5}  # fmt: skip
# The same pipeline on real H&E tiles (../shared/data beside the repository): the one command and
# what it measured (docs/cpu_pretraining.md has the search and the protocol).
REAL_TILES_COMMAND = "make pretrain-cpu"
REAL_TILES_FIGURES = (
    "EBHI-Seg (6 classes, case-grouped 60/40 splits, mean of 5) at 96 px: linear probe 0.494 "
    "(seed 0) / 0.485 (seed 1) vs 0.318 for random init (mean of six twins) and 0.378 for "
    "colour histograms, kNN 0.449 / 0.436 vs 0.266 / 0.300 (16.0 min of fit on 2 CPU cores, "
    "1,656 steps)"
)
SLIDE_MPP = 0.5  # µm/px the synthetic slides are "scanned" at
STORE_MPP = 1.0  # µm/px of the stored tiles (96 px = 96 µm: several cells, a gland)
TILE_SIZE = 96
SUB_INDENT = "      "  # lines a step prints under its title (pretraining progress)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic (or your) slides in a few minutes",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  scratchpath demo --out demo_output\n"
            "  scratchpath demo --out demo_real --slides /data/slides\n"
            "  scratchpath demo --out /tmp/check --quick"
        ),
    )
    parser.add_argument("--out", default="demo_output", type=Path, help="output folder")
    parser.add_argument(
        "--slides",
        type=Path,
        metavar="PATH",
        help="your slides (file or folder) instead of synthetic ones; the evaluation still uses "
        "the synthetic labelled tiles",
    )
    parser.add_argument(
        "--assume-mpp",
        type=float,
        metavar="X",
        help="µm per pixel of --slides files that record none (otherwise they are skipped)",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes (< 1 min)")
    parser.add_argument(
        "--recipe", type=Path, help="pretraining recipe (default: recipes/demo.yaml)"
    )
    parser.add_argument("--steps", type=int, help="pretraining steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of slides, tiles and training")
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator for pretraining (cpu)"
    )
    parser.set_defaults(run=run)


@dataclass
class _Progress:
    """Numbered one-line progress reports with the time each step took."""

    total: int
    step: int = 0
    sub_lines: bool = False  # the running step printed lines of its own (see `lines_below`)

    @contextlib.contextmanager
    def __call__(self, title: str) -> Iterator[list[str]]:
        self.step += 1
        self.sub_lines = False
        start = time.perf_counter()
        print(f"[{self.step}/{self.total}] {title} ...", end="", flush=True)
        detail: list[str] = []
        try:
            yield detail
        except BaseException:
            print(f"{SUB_INDENT if self.sub_lines else ' '}failed", flush=True)
            raise
        seconds = time.perf_counter() - start
        lead = SUB_INDENT if self.sub_lines else " "
        print(f"{lead}{'; '.join(detail) or 'done'} ({seconds:.1f} s)", flush=True)

    @contextlib.contextmanager
    def lines_below(self) -> Iterator[io.TextIOBase]:
        """A stream to the terminal (this process's stdout as it is now, even while fd 1 is
        redirected to a log) whose lines appear indented under the running step's title."""
        terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        progress = self

        class Indented(io.TextIOBase):
            def write(self, text: str) -> int:
                if not progress.sub_lines:
                    progress.sub_lines = True
                    terminal.write("\n")
                for line in text.splitlines(keepends=True):
                    terminal.write(line if line.strip() == "" else SUB_INDENT + line)
                terminal.flush()
                return len(text)

        try:
            yield Indented()
        finally:
            terminal.close()


def find_recipe(explicit: Path | None) -> Path:
    """``--recipe``, else recipes/demo.yaml in the working directory or the source checkout."""
    if explicit is not None:
        if not explicit.is_file():
            raise ScratchpathError(f"--recipe: {explicit} not found")
        return explicit
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "recipes" / "demo.yaml"
        if candidate.is_file():
            return candidate
    raise ScratchpathError("--recipe: recipes/demo.yaml not found; run from the repository root")


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (Python and C level) to ``log`` for the duration."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else DEFAULT
    out: Path = args.out
    recipe = find_recipe(args.recipe)
    if args.slides is not None and not args.slides.exists():
        raise ScratchpathError(f"--slides: {args.slides} does not exist")
    if args.steps is not None and args.steps < 1:
        raise ScratchpathError(f"--steps: must be at least 1, got {args.steps}")
    slides_source = None if args.slides is None else str(args.slides.resolve())
    _claim_output(out, {"quick": args.quick, "seed": args.seed, "slides": slides_source})
    started = time.perf_counter()
    progress = _Progress(total=9)
    slides = _slides_step(progress, args, sizes, out)
    labels_csv = _tiles_step(progress, args, sizes, out)
    pretrain_store = _ingest_step(progress, slides, out, args.assume_mpp)
    labelled_store = _import_step(progress, labels_csv, out)
    preview_png = _preview_step(progress, pretrain_store, recipe, args.seed, out)
    checkpoint = _fit_step(progress, args, sizes, recipe, pretrain_store, out)
    model_dir = _export_step(progress, checkpoint, out)
    metrics = _eval_step(progress, args, sizes, model_dir, labelled_store, out)
    slide_table, heatmap = _slide_level_step(progress, args, sizes, model_dir, out)
    _summary(out, model_dir, metrics, preview_png, pretrain_store, time.perf_counter() - started,
             real_slides=args.slides is not None, slide_level=(slide_table, heatmap))  # fmt: skip
    return 0


def _claim_output(out: Path, settings: dict) -> None:
    """Reuse ``out`` only for the same demo settings: stores append, so mixing runs would mix
    slides and duplicate labelled tiles."""
    import json

    marker = out / "demo.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != settings:
            raise ScratchpathError(
                f"--out: {out} holds a demo made with other settings ({previous}); "
                "choose another folder or delete it"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise ScratchpathError(f"--out: {out} exists and is not a demo folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings) + "\n")


def _slides_step(progress: _Progress, args, sizes: dict, out: Path) -> list[Path]:
    if args.slides is not None:
        with progress(f"slides: using {args.slides}") as detail:
            from scratchpath.ingest import find_slides

            found = find_slides([args.slides])
            if not found:
                raise ScratchpathError(f"--slides: no slide files in {args.slides}")
            detail.append(f"{len(found)} slide file(s)")
        return [args.slides]
    from scratchpath.synthetic import TISSUE_TYPES, write_slide

    width, height = sizes["size"]
    n = sizes["slides"]
    layouts = ["mixed"] * n if args.quick else ["mixed", "mixed", *TISSUE_TYPES][:n]
    folder = out / "slides"
    title = f"synthetic slides: {n} x {width}x{height} px @ {SLIDE_MPP} µm/px -> {folder}"
    with progress(title) as detail:
        written, paths = 0, []
        for i, tissue in enumerate(layouts):
            path = folder / f"synthetic_{i:02d}_{tissue}_{width}x{height}.ome.tif"
            if not path.exists():  # deterministic: an earlier run wrote the same file
                write_slide(path, width, height, mpp=SLIDE_MPP, tissue=tissue, seed=args.seed + i)
                written += 1
            paths.append(path)
        detail.append(f"{written} written, {n - written} reused")
    return paths


def _tiles_step(progress: _Progress, args, sizes: dict, out: Path) -> Path:
    from scratchpath.synthetic import TISSUE_TYPES, write_tile_set

    folder = out / "tiles"
    per_class = sizes["per_class"]
    title = f"labelled tiles: {len(TISSUE_TYPES)} tissue types x {per_class} -> {folder}"
    with progress(title) as detail:
        labels = folder / "labels.csv"
        if labels.exists() and _csv_rows(labels) == per_class * len(TISSUE_TYPES):
            detail.append("reused")
        else:
            write_tile_set(folder, per_class, TILE_SIZE, seed=args.seed + 1000, mpp=STORE_MPP)
            detail.append(f"{per_class * len(TISSUE_TYPES)} tiles, groups of 8 per source slide")
    return labels


def _csv_rows(path: Path) -> int:
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def _ingest_step(
    progress: _Progress, slides: list[Path], out: Path, assume_mpp: float | None
) -> Path:
    from scratchpath.ingest import ingest

    store = out / "stores" / "pretrain"
    title = f"ingest at {STORE_MPP} µm/px, {TILE_SIZE} px tiles -> {store}"
    with progress(title) as detail:
        report = ingest(slides, store, mpp=STORE_MPP, tile_size=TILE_SIZE, min_tissue=0.5,
                        assume_mpp=assume_mpp, progress=False)  # fmt: skip
        from scratchpath.store import PatchStore

        n_tiles = len(PatchStore(store))
        new = sum(s["status"] == "ok" for s in report.slides)
        detail.append(f"{n_tiles} tiles in the store, {report.n_tiles} from {new} new slide(s)")
        if report.failed:
            detail.append(f"{len(report.failed)} slide(s) failed (see {store}/run.json)")
        if n_tiles == 0:
            reasons = "; ".join(str(s.get("reason")) for s in report.failed)[:300]
            raise ScratchpathError(f"{store}: no tiles ingested ({reasons or 'no tissue found'})")
    return store


def _import_step(progress: _Progress, labels_csv: Path, out: Path) -> Path:
    from scratchpath.store.tiles_import import import_tiles

    store = out / "stores" / "labelled"
    with progress(f"import labelled tiles -> {store}") as detail:
        report = import_tiles(labels_csv.parent, store, labels_csv=labels_csv, group_column="group",
                              mpp=STORE_MPP, tile_size=TILE_SIZE)  # fmt: skip
        if report.failed:
            raise ScratchpathError(f"{labels_csv}: {len(report.failed)} tiles failed to import")
        detail.append(f"{report.imported} imported, {report.skipped} already there")
    return store


def _preview_step(progress: _Progress, store: Path, recipe: Path, seed: int, out: Path) -> Path:
    from scratchpath.cli import preview

    png = out / "pictures" / "augmentations.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    with progress(f"augmentation preview -> {png}") as detail:
        namespace = argparse.Namespace(store=[str(store)], recipe=str(recipe), views=None,
                                       out=str(png), n=6, seed=seed, device="cpu")  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()) as said:
            preview.run(namespace)
        detail.append(said.getvalue().strip().removeprefix(f"wrote {png}: "))
    return png


def _fit_step(progress: _Progress, args, sizes: dict, recipe: Path, store: Path, out: Path) -> Path:
    from scratchpath.cli.fit import run_fit

    root = out / "run"
    log = out / "logs" / "fit.log"
    argv = ["--config", str(recipe), f"--data.stores=[{store}]",
            f"--trainer.default_root_dir={root}", f"--trainer.accelerator={args.accelerator}",
            f"--seed_everything={args.seed}"]  # fmt: skip
    steps = args.steps or sizes["steps"]
    if steps is not None:
        argv.append(f"--trainer.max_steps={steps}")
    if sizes["batch"] is not None:
        argv.append(f"--data.batch_size={sizes['batch']}")
    if steps is not None:
        argv.append(f"--trainer.log_every_n_steps={max(1, min(10, steps // 3))}")
    title = f"pretrain ({recipe.name}{f', {steps} steps' if steps else ''}) -> {root}"
    with progress(title) as detail, progress.lines_below() as terminal:
        with _output_to(log):  # Lightning's output to the log; progress lines to the terminal
            status = run_fit(argv, progress_stream=terminal)
        if status != 0:
            raise ScratchpathError(f"{log}: pretraining exited with {status}:\n{_tail(log)}")
        checkpoint = root / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise ScratchpathError(f"{checkpoint}: not written (see {log})")
        loss = _last_loss(root)
        detail.append(f"final loss {loss:.3f}" if loss is not None else "trained")
        detail.append(f"log {log}")
    return checkpoint


def _last_loss(root: Path) -> float | None:
    """Last train/loss of the newest CSV log (the run just made)."""
    logs = sorted((root / "logs").glob("version_*/metrics.csv"), key=os.path.getmtime)
    if not logs:
        return None
    with open(logs[-1], newline="") as f:
        values = [row.get("train/loss") for row in csv.DictReader(f)]
    values = [float(v) for v in values if v]
    return values[-1] if values else None


def _export_step(progress: _Progress, checkpoint: Path, out: Path) -> Path:
    from scratchpath.export import export_checkpoint

    model_dir = out / "model"
    with progress(f"export backbone -> {model_dir}") as detail:
        export_checkpoint(checkpoint, model_dir, overwrite=True)
        detail.append(", ".join(sorted(p.name for p in model_dir.iterdir())))
    return model_dir


def _eval_step(progress: _Progress, args, sizes: dict, model_dir: Path, store: Path, out: Path):
    from scratchpath.finetune.report import run_evaluation

    eval_dir = out / "eval"
    title = f"evaluate (kNN + linear probe, 30 % grouped test split) -> {eval_dir}"
    with progress(title) as detail:
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = run_evaluation(str(model_dir), eval_dir, data=str(store), test_fraction=0.3,
                                     group_column="group", linear_epochs=sizes["linear_epochs"],
                                     seed=args.seed)  # fmt: skip
        detail.append(f"{metrics['train']['n_tiles']} train / {metrics['test']['n_tiles']} test")
    return metrics


def _slide_level_step(progress: _Progress, args, sizes: dict, model_dir: Path, out: Path):
    """The slide-level step: a labelled synthetic cohort, then one ``eval --slides`` command
    (printed under the step); returns its table and heatmap."""
    import shlex
    import shutil

    from scratchpath.cli import main
    from scratchpath.synthetic import write_cohort

    cohort, report = out / "cohort", out / "eval_slides"
    size, n = sizes["cohort_size"], sizes["cohort"]
    shutil.rmtree(report, ignore_errors=True)  # its embeddings belong to this run's model
    title = f"slide level: {n} labelled slides, ABMIL vs mean pooling -> {report}"
    with progress(title) as detail, progress.lines_below() as terminal:
        labels = write_cohort(
            cohort, n, size=(size, size), mpp=STORE_MPP, focus_um=sizes["focus_um"], seed=args.seed
        )
        command = [
            "eval",
            "--slides",
            str(labels),
            "--model",
            str(model_dir),
            "--out",
            str(report),
            "--repeats",
            str(sizes["mil_repeats"]),
            "--mil-epochs",
            str(sizes["mil_epochs"]),
            "--heatmaps",
            "1",
            "--seed",
            str(args.seed),
        ]
        terminal.write(f"$ scratchpath {shlex.join(command)}\n")
        with (
            contextlib.redirect_stdout(io.StringIO()) as said,
            contextlib.redirect_stderr(io.StringIO()) as errors,
        ):  # the table is shown at the end; embed's per-slide lines are not
            status = main(command)
        if status != 0:
            why = errors.getvalue().strip().splitlines()[-1:] or [f"exit status {status}"]
            raise ScratchpathError(f"scratchpath {shlex.join(command)}: {why[0]}")
        metrics = json.loads((report / "slide_metrics.json").read_text())
        abmil, mean = metrics["results"]["abmil"], metrics["results"]["mean_pool"]
        detail.append(f"AUC {abmil['auc']:.2f} ABMIL vs {mean['auc']:.2f} mean pooling")
    table = said.getvalue().strip().rsplit("\nreport:", 1)[0]
    return table, (metrics["heatmaps"] or [None])[0]


def _summary(out: Path, model_dir: Path, metrics: dict, preview_png: Path, store: Path,
             seconds: float, *, real_slides: bool,
             slide_level: tuple[str, str | None]) -> None:  # fmt: skip
    from scratchpath.finetune.report import format_table

    print()
    print(format_table(metrics))
    if real_slides:
        print("note: pretrained on your slides, evaluated on the synthetic labelled tiles "
              "(your slides carry no labels)")  # fmt: skip
    slide_table, heatmap = slide_level
    print(f"\nslide level (synthetic cohort, {out / 'eval_slides'}):\n{slide_table}")
    eval_dir = out / "eval"
    thumbnails = sorted((store / "thumbnails").glob("*.png"))
    minutes, secs = divmod(round(seconds), 60)
    print(f"\ndemo finished in {minutes} min {secs:02d} s")
    print(f"  model     {model_dir}  (scratchpath.load_backbone({str(model_dir)!r}))")
    print(f"  metrics   {eval_dir / 'metrics.json'}")
    print(f"  pictures  {preview_png}")
    print(f"            {eval_dir / 'confusion_matrix.png'}, {eval_dir / 'embedding_pca.png'}")
    if heatmap:
        print(f"            {heatmap} (ABMIL attention on a slide of the cohort)")
    if thumbnails:
        print(f"            {store / 'thumbnails'}/*.png ({len(thumbnails)} slide thumbnails "
              "with the kept tiles outlined)")  # fmt: skip
    print(f"  training  {out / 'run'} (checkpoints, CSV + TensorBoard logs), {out / 'logs'}")
    print(f"\non real H&E: {REAL_TILES_COMMAND}  (recipes/cpu_pretrain.yaml: stores from "
          "../shared/data, pretraining, export, EBHI-Seg evaluation)")  # fmt: skip
    print(f"  it gave: {REAL_TILES_FIGURES}")
