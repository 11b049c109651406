"""``scratchpath fit``: pretrain a backbone from a recipe (LightningCLI).

A run is a YAML recipe plus command-line overrides of any field::

    scratchpath fit --config recipes/smoke_dino.yaml
    scratchpath fit --config recipes/dino_vits16.yaml --trainer.max_epochs 50 \\
        --data.stores '[/data/tcga_store]' --data.batch_size 128
    scratchpath fit --config recipes/dino_vits16.yaml --ckpt_path last      # resume (must exist)
    scratchpath fit --config recipes/dino_vits16.yaml --ckpt_path last-or-fresh   # job scripts
    scratchpath fit --config recipes/dino_vits16.yaml --print_config        # resolved recipe
    scratchpath fit --model dino --model.backbone vit_tiny_patch16_224 --data.stores '[store]' \\
        --data.views scratchpath.views.MultiCrop

A field the recipe leaves out may come from the environment instead (cluster recipes leave out
``data.stores``): ``SCRATCHPATH_FIT_DATA__STORES='[/data/s]'`` (``SCRATCHPATH_FIT_`` + the dotted
key in upper case with ``__`` for ``.``). Precedence: defaults < environment < recipe < command
line.

What this module adds to LightningCLI: method aliases (``--model dino``), one-line errors for an
unknown method / timm model / missing store before any worker starts, ``precision`` chosen for the
hardware when the recipe leaves it empty (bf16-mixed on GPU, 32-true on CPU), default CSV +
TensorBoard loggers in ``<default_root_dir>/logs/version_N``, checkpoints in
``<default_root_dir>/checkpoints`` (``last.ckpt`` plus the best by online kNN accuracy when the
run evaluates online, else the newest periodic ones: an SSL loss does not rank models),
``--ckpt_path last`` that fails naming the folder when there is nothing to resume
(``last-or-fresh`` starts fresh instead), throughput logging, a plain progress line every
``log_every_n_steps`` steps when the
recipe turns the progress bar off (step / total, loss, rate, time left), preemption-safe
checkpoints (SIGTERM / SIGUSR1 saved at an optimiser-step boundary; under SLURM, Lightning's
auto-requeue is turned off and ``recipes/slurm_train.sbatch`` requeues on exit status 138), and
the resolved config recorded in
every checkpoint (``trainer.scratchpath_config``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from jsonargparse import ArgumentError
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from scratchpath.callbacks import OnlineEvaluation, PreemptionCheckpoint, ProgressLog, Throughput
from scratchpath.data import PatchDataModule
from scratchpath.errors import ScratchpathError
from scratchpath.objectives import OBJECTIVES, SSLObjective

ENV_PREFIX = "SCRATCHPATH_FIT"
DEFAULT_CHECKPOINT_EVERY_N_STEPS = 1000
# Periodic checkpoints kept besides last.ckpt when no online evaluation ranks them (the newest).
DEFAULT_PERIODIC_CHECKPOINTS_KEPT = 3
LAST, LAST_OR_FRESH = "last", "last-or-fresh"


def class_path(cls: type) -> str:
    """``module.Class`` of an objective, as a recipe's ``model.class_path`` spells it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def expand_method_alias(argv: list[str]) -> list[str]:
    """Turn ``--model dino`` / ``--model=dino`` into the objective's class path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--model" and i + 1 < len(out) and out[i + 1].lower() in OBJECTIVES:
            out[i + 1] = class_path(OBJECTIVES[out[i + 1].lower()])
        elif arg.startswith("--model=") and arg[len("--model=") :].lower() in OBJECTIVES:
            out[i] = "--model=" + class_path(OBJECTIVES[arg[len("--model=") :].lower()])
    return out


class ScratchpathCLI(LightningCLI):
    """LightningCLI for SSL pretraining: ``model`` is any :class:`SSLObjective` subclass,
    ``data`` a :class:`PatchDataModule`; builds everything, the caller runs ``trainer.fit``."""

    def __init__(self, args: list[str], progress_stream: TextIO | None = None) -> None:
        self.progress_stream = progress_stream  # ProgressLog's stream (None: stderr)
        super().__init__(
            model_class=SSLObjective,
            subclass_mode_model=True,
            datamodule_class=PatchDataModule,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={
                "prog": "scratchpath fit",
                "description": (
                    "Pretrain a backbone from scratch with a self-supervised objective. "
                    "Start from a recipe (--config recipes/<name>.yaml) and override any field "
                    "on the command line (--trainer.max_steps 100); fields the recipe leaves out "
                    f"may come from the environment ({ENV_PREFIX}_DATA__STORES='[/data/a]'). "
                    "Methods: "
                    + ", ".join(f"--model {name}" for name in sorted(OBJECTIVES))
                    + ". Resume with --ckpt_path last (an error if there is no checkpoint) or "
                    "--ckpt_path last-or-fresh (start fresh if there is none: job scripts)."
                ),
                "default_env": True,
                "env_prefix": ENV_PREFIX,
                "exit_on_error": False,
            },
            auto_configure_optimizers=False,  # each objective builds its own (LARS / AdamW)
            run=False,
            args=args,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # LightningCLI warns when both sys.argv and args are given; `scratchpath fit` always is.
        self.config = parser.parse_args(args)
        check_config(self.config)  # before seeding or building anything: one-line errors

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help=(
                "Resume from this checkpoint file; 'last': the newest last*.ckpt in "
                "<trainer.default_root_dir>/checkpoints, an error naming that folder if there is "
                "none; 'last-or-fresh': the same, but start a fresh run if there is none (for "
                "job scripts whose first run has no checkpoint yet)."
            ),
        )

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.trainer.precision is None:
            config.trainer.precision = auto_precision(config.trainer.accelerator)
        if config.trainer.default_root_dir is None:
            name = Path(str(config.model.class_path)).suffix.lstrip(".").lower()
            config.trainer.default_root_dir = os.path.join("runs", name)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self.config_init.trainer
        root = str(trainer_config.default_root_dir)
        callbacks = list(trainer_config.get("callbacks") or [])
        extra = self._default_callbacks(callbacks, root)
        kwargs["callbacks"] = callbacks + extra
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(root)
        if SLURMEnvironment.detect():
            kwargs["plugins"] = slurm_plugins(trainer_config.get("plugins"))
        return super().instantiate_trainer(**kwargs)

    def _default_callbacks(self, callbacks: list[Callback], root: str) -> list[Callback]:
        """The callbacks every run gets unless the recipe lists its own of that type."""
        extra: list[Callback] = []
        online = [c for c in callbacks if isinstance(c, OnlineEvaluation)]
        checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        for checkpoint in checkpoints:
            if checkpoint.dirpath is None:
                checkpoint.dirpath = os.path.join(root, "checkpoints")
        if not checkpoints:
            extra.append(default_model_checkpoint(root, online[0] if online else None))
        if not any(isinstance(c, Throughput) for c in callbacks):
            extra.append(Throughput(window=self.config.trainer.log_every_n_steps or 50))
        if not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            extra.append(PreemptionCheckpoint())
        # no progress bar (smoke recipes, logs, CI): a plain line every log_every_n_steps
        bar_off = self.config.trainer.get("enable_progress_bar") is False
        if bar_off and not any(isinstance(c, ProgressLog) for c in callbacks):
            extra.append(ProgressLog(stream=self.progress_stream))
        return extra

    def after_instantiate_classes(self) -> None:
        # Recorded in every checkpoint by SSLObjective.on_save_checkpoint (provenance).
        self.trainer.scratchpath_config = self.parser.dump(self.config, skip_unset=False)


def check_config(config: Any) -> None:
    """Fail fast, in one line, on what would otherwise fail later inside a worker."""
    _check_backbone(config.model)
    _check_stores(config.data.stores, "data.stores")
    for i, callback in enumerate(config.trainer.callbacks or []):
        init = callback.get("init_args") or {}
        if str(callback.get("class_path", "")).endswith(".OnlineEvaluation"):
            for key in ("train_store", "test_store"):
                if init.get(key) is not None:
                    _check_stores([init[key]], f"trainer.callbacks[{i}].{key}")


def slurm_plugins(plugins: Any) -> list[Any]:
    """The recipe's plugins plus ``SLURMEnvironment(auto_requeue=False)`` (unless it has one).

    Lightning's auto-requeue saves a checkpoint inside the SIGUSR1 handler, in the middle of a
    step; :class:`~scratchpath.callbacks.PreemptionCheckpoint` saves at the next optimiser-step
    boundary instead and ``recipes/slurm_train.sbatch`` requeues the job itself.
    """
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if not any(isinstance(plugin, SLURMEnvironment) for plugin in listed):
        listed.append(SLURMEnvironment(auto_requeue=False))
    return listed


def auto_precision(accelerator: Any) -> str:
    """bf16 mixed precision on a CUDA GPU that supports it, else full fp32."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    on_cpu = name in ("cpu", "cpuaccelerator", "mps", "mpsaccelerator")
    if on_cpu or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def default_loggers(root: str) -> list[Any]:
    """CSV (metrics.csv) and TensorBoard logs sharing ``<root>/logs/version_N``."""
    csv = CSVLogger(save_dir=root, name="logs")  # first: trainer.log_dir is its folder
    return [csv, TensorBoardLogger(save_dir=root, name="logs", version=csv.version)]


def default_model_checkpoint(root: str, online: OnlineEvaluation | None) -> ModelCheckpoint:
    """``last.ckpt`` plus, when the run has online evaluation, the best checkpoint by online kNN
    accuracy (``best-step*.ckpt``, saved right after each evaluation); without it, the newest
    ``DEFAULT_PERIODIC_CHECKPOINTS_KEPT`` periodic ones (``step*.ckpt``, every
    ``DEFAULT_CHECKPOINT_EVERY_N_STEPS`` steps). A self-supervised loss is not a model-quality
    ranking (a collapsed DINO or a trivial MAE can have the lowest), so nothing is "best" by it."""
    if online is not None:
        filename, monitor, mode, keep = "best-step{step:08d}", "online/knn_acc", "max", 1
        every = online.every_n_steps
    else:  # "step" is always among the monitored values: keeps the newest ones
        filename, monitor, mode = "step{step:08d}", "step", "max"
        keep, every = DEFAULT_PERIODIC_CHECKPOINTS_KEPT, DEFAULT_CHECKPOINT_EVERY_N_STEPS
    return ModelCheckpoint(
        dirpath=os.path.join(root, "checkpoints"),
        filename=filename,
        monitor=monitor,
        mode=mode,
        save_last=True,
        save_top_k=keep,
        every_n_train_steps=every,
        auto_insert_metric_name=False,
    )


def resolve_ckpt_path(value: str | None, checkpoint_dir: str) -> str | None:
    """The checkpoint ``--ckpt_path VALUE`` resumes from (None: a fresh run).

    ``last`` / ``last-or-fresh``: the newest ``last*.ckpt`` in ``checkpoint_dir`` (Lightning's
    rule). With none there, ``last`` is an error naming the folder (Lightning would only warn and
    train from step 0, e.g. when a job starts in another working directory than the run's), and
    ``last-or-fresh`` starts a fresh run, saying so. A local file path must exist.
    """
    if value is None:
        return None
    if value not in (LAST, LAST_OR_FRESH):
        if "://" not in value and not Path(value).is_file():
            raise ScratchpathError(f"--ckpt_path: checkpoint not found: {value}")
        return value
    folder = Path(checkpoint_dir).absolute()
    found = sorted(folder.glob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    if found:
        return str(found[-1])
    if value == LAST:
        raise ScratchpathError(
            f"--ckpt_path last: no last*.ckpt in {folder}; use --ckpt_path last-or-fresh to "
            "start a fresh run when there is none"
        )
    print(f"--ckpt_path last-or-fresh: no checkpoint in {folder}; starting fresh", file=sys.stderr)
    return None


def _check_backbone(model_config: Any) -> None:
    import timm

    backbone = (model_config.get("init_args") or {}).get("backbone")
    if backbone is not None and not timm.is_model(str(backbone)):
        raise ScratchpathError(
            f"model.backbone: unknown timm model {backbone!r} (see timm.list_models())"
        )


def _check_stores(paths: Any, field: str) -> None:
    for path in paths or []:
        text = str(path)
        if "://" not in text and not Path(text).exists():
            raise ScratchpathError(f"{field}: patch store not found: {text}")


def _one_line(message: str, argv: list[str]) -> str:
    """jsonargparse's nested, multi-line parse errors condensed to one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    head = lines[0]
    if head.startswith('Parser key "model"') or "Import path" in head:
        requested = _model_argument(argv)
        methods = ", ".join(sorted(OBJECTIVES))
        return (
            f"model: unknown method{f' {requested!r}' if requested else ''}; use one of "
            f"{methods} or the class_path of an SSLObjective subclass"
        )
    if head.startswith("the following arguments are required:"):
        keys = [k.strip() for k in head.split(":", 1)[1].split(",")]
        env = ", ".join(f"{ENV_PREFIX}_{k.upper().replace('.', '__')}" for k in keys)
        return f"{', '.join(keys)}: required; set it in the recipe, on the command line or in {env}"
    if head.startswith("Parser key") and len(lines) > 1:
        key = head.split('"')[1] if '"' in head else head
        return f"{key}: {lines[1]}"
    return head


def add_parser(subparsers: Any) -> None:
    """List ``fit`` in ``scratchpath --help``; its arguments are LightningCLI's (``fit --help``)."""
    parser = subparsers.add_parser(
        "fit",
        help="pretrain a backbone from a recipe (LightningCLI; see 'scratchpath fit --help')",
        add_help=False,
    )
    parser.set_defaults(run=lambda args: run_fit(["--help"]))


def _model_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("--model", "--model.class_path") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--model=", "--model.class_path=")):
            return arg.split("=", 1)[1]
    return None


def run_fit(
    argv: list[str],
    *,
    progress_stream: TextIO | None = None,
    early_signals: list[int] | None = None,
) -> int:
    """Run ``scratchpath fit ARGV``; returns the exit status (``128 + signal`` when preempted).
    ``progress_stream``: where the progress lines go (default stderr; the demo sends them to the
    terminal while the rest of the output goes to its log). ``early_signals``: stop signals
    received before this call (``scratchpath.cli.main`` records them from its start); they and
    any received later make the run save and stop at its first optimiser-step boundary."""
    try:
        cli = ScratchpathCLI(args=expand_method_alias(argv), progress_stream=progress_stream)
    except ArgumentError as error:
        raise ScratchpathError(_one_line(str(error), argv)) from None
    except SystemExit as done:  # --help, --print_config
        return int(done.code or 0)
    trainer = cli.trainer
    preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    checkpoint = trainer.checkpoint_callback
    folder = getattr(checkpoint, "dirpath", None) or os.path.join(
        str(trainer.default_root_dir), "checkpoints"
    )
    # A stop signal that comes while the model and data are set up (SLURM's --signal may arrive
    # at any time) is remembered and acted on at the first step instead of killing the process.
    found = {
        getattr(signal, name): signal.getsignal(getattr(signal, name))
        for name in preemption.signals
    }
    for signum in found:
        signal.signal(signum, preemption._on_signal)
    for signum in early_signals or []:
        preemption._on_signal(signum, None)
    try:
        ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, folder)
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        preemption.received = preemption.received or int(signal.SIGTERM)
    except Exception:
        # A failure that followed a non-finite loss (e.g. an evaluation on NaN weights) is
        # reported as the non-finite step, which is what the user has to change.
        nonfinite = getattr(cli.model, "nonfinite_error", None)
        if nonfinite is None:
            raise
        raise nonfinite from None
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)
    if preemption.received is not None:
        name = signal.Signals(preemption.received).name
        where = preemption.saved_path or "no checkpoint written"
        print(
            f"stopped by {name} at step {trainer.global_step}: {where}; "
            "resume with the same command plus --ckpt_path last",
            file=sys.stderr,
        )
        return 128 + preemption.received
    return 0
