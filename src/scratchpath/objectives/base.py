"""The shared LightningModule of every self-supervised objective.

It owns what all objectives share: the online ``backbone``, the optimiser with its per-step LR /
weight-decay schedules, the EMA update of a momentum teacher, logging, the non-finite-loss stop,
the random stream of each step and the ``checkpoint["scratchpath"]`` provenance record. An
objective subclasses it and implements ``compute_loss(views)``. Precision (bf16) and
SyncBatchNorm are the Trainer's flags.

A training step never waits for the device: the loss is logged as a tensor (Lightning turns it
into a number only every ``log_every_n_steps``), the scheduled LR / weight decay / momentum are
logged on those logging steps only (a Python number becomes a blocking host-to-device copy), and
the non-finite-loss stop is a :class:`~scratchpath.distributed.CrossRankCheck`: reduced over the
ranks and copied to the host without waiting, decided at the same steps on every rank.
``tests/test_sync.py`` counts the synchronisations and the tensors made from host data of whole
steps of ``scratchpath fit``: zero.

No checkpoint is written with non-finite weights: :meth:`SSLObjective.on_save_checkpoint`
checks every parameter and buffer first (one device reduction and one synchronisation per
checkpoint) and refuses the save, naming the first non-finite step.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from scratchpath.backbones import create_backbone
from scratchpath.distributed import CrossRankCheck, HostCopy, is_logging_step
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.optim import (
    cosine_ramp,
    create_optimizer,
    param_groups,
    scaled_lr,
    warmup_cosine,
)
from scratchpath.weights import (
    format_init_report,
    from_scratch,
    init_backbone,
    pre_init_record,
)

CHECKPOINT_VERSION = 2  # 2: the init record (checkpoint["scratchpath"]["init"])


class SSLObjective(L.LightningModule):
    """Base of the SSL objectives: backbone, optimiser, schedules, EMA teacher, checkpoint record.

    Args:
        backbone: timm model name, created from scratch
            (:func:`scratchpath.backbones.create_backbone`).
        backbone_kwargs: timm keyword arguments, e.g. ``{"img_size": 224, "patch_size": 16}``.
        optimizer: ``"adamw"`` or ``"lars"`` (LARS for large-batch SimCLR / MoCo v3 ResNets).
        lr: peak LR for a global batch of ``lr_reference_batch``; the run uses
            ``lr × global_batch / lr_reference_batch`` with global batch = per-device batch ×
            devices × gradient accumulation.
        min_lr: LR at the end of the cosine decay.
        lr_reference_batch: the batch size ``lr`` is given for.
        warmup_epochs: linear LR warm-up from 0 (may be fractional).
        weight_decay: weight decay at the first step.
        weight_decay_end: weight decay at the last step (cosine); ``None`` keeps it constant.
        adam_betas: AdamW betas (MAE uses ``(0.9, 0.95)``).
        compile: ``torch.compile`` the backbones in place (state-dict keys are unchanged): each
            transformer block of a ViT (:meth:`modules_to_compile`), else the whole backbone.
        channels_last: keep the 4-D weights of every module in channels-last (NHWC) memory
            order for training, as timm's ``--channels-last``: convolutions then run oneDNN's and
            cuDNN's NHWC kernels (the slim ResNet-10's step 1.35x faster on 2 CPU cores,
            ``benchmarks/bench_cpu_step.py``; usual on GPUs under bf16). The views need no
            conversion (a convolution follows its weight's order). Only the memory order
            changes: checkpoints load either way and exports are written contiguous. No effect
            on a ViT beyond its patch embedding.
        activation_checkpointing: recompute backbone activations in backward (timm).
        nonfinite_check_every: how often (steps) the non-finite-loss stop looks at the losses:
            every step's loss is checked on the device; every this many steps each rank starts
            a non-blocking reduction of the first non-finite step over all ranks and reads the
            one started the time before, so every rank stops at the same step, naming the
            first non-finite step, at most twice this many steps later, without a per-step host
            sync (:class:`~scratchpath.distributed.CrossRankCheck`).
        init: start the backbone (nothing else: heads stay random) from given weights instead
            of random ones: an export folder, a timm-format ``.safetensors`` file or a
            ``.pth`` / ``.bin`` / ``.pt`` / ``.ckpt`` read with ``weights_only=True``
            (:func:`scratchpath.weights.init_backbone`; never fetched from a hub). An EMA
            teacher starts as a copy of it. The record of it (file, sha256, architectures,
            keys loaded / missing / unexpected / reshaped) goes into every checkpoint and
            export; a resumed run keeps the record of the checkpoint it resumes.
        init_strict: every backbone weight must come from ``init`` and every tensor of it must
            be used (after timm's conversion and the classifier head dropped); ``False`` loads
            the keys that fit and reports the rest.
    """

    objective_name: ClassVar[str] = ""

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adamw", "lars"] = "adamw",
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        lr_reference_batch: int = 256,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
        channels_last: bool = False,
        activation_checkpointing: bool = False,
        nonfinite_check_every: int = 100,
        init: str | None = None,
        init_strict: bool = True,
    ) -> None:
        super().__init__()
        if nonfinite_check_every < 1:
            raise ScratchpathError(
                f"nonfinite_check_every: must be at least 1, got {nonfinite_check_every}"
            )
        self.save_hyperparameters()  # also collects the subclass's constructor arguments
        self.backbone = create_backbone(
            backbone, activation_checkpointing=activation_checkpointing, **(backbone_kwargs or {})
        )
        # How the backbone's weights began; checkpoints and exports carry it (resume keeps the
        # checkpoint's: see on_load_checkpoint).
        self.init_record = from_scratch()
        if init is not None:
            self.init_record = init_backbone(
                self.backbone, init, architecture=backbone, strict=init_strict
            )
            rank_zero_info(format_init_report(self.init_record))
        self.total_steps = 0  # optimizer steps of the whole run, known once training starts
        self.steps_per_epoch = 0.0
        self.global_batch = 0  # per-device batch × devices × accumulation, from the first batch
        self._run_seed = 0
        # Non-finite stop: on the device, the first step with a non-finite loss and the first
        # with a NaN / +inf / -inf one (each inf until seen), and its cross-rank check.
        self._nonfinite: torch.Tensor | None = None
        self._nonfinite_check = CrossRankCheck(nonfinite_check_every)
        self._step_at_batch_start = -1
        # Set when the run failed for another reason after a non-finite loss (the step it
        # names is the real cause); ``scratchpath fit`` reports it instead of the other error.
        self.nonfinite_error: ScratchpathError | None = None

    # --- what an objective implements -------------------------------------------------------
    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The objective's scalar loss for normalised float views, each ``(B, 3, h, w)``."""
        raise NotImplementedError

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, EMA teacher)`` module pairs updated after every optimiser step."""
        return []

    def no_weight_decay(self) -> set[str]:
        """Full parameter names never decayed (the backbone's positional embeddings and tokens)."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in names}

    def lr_scales(self) -> dict[str, float]:
        """Per-parameter LR multipliers by full name (layer-wise decay); none by default."""
        return {}

    def modules_to_compile(self) -> list[nn.Module]:
        """Modules that ``compile=True`` compiles in place: of each backbone (online and EMA
        teacher), the transformer blocks of a ViT, else the whole backbone.

        Blocks rather than the ViT's ``forward``: objectives that need tokens (MAE's visible
        patches, DINOv2's masked patches) call the ViT's parts themselves and would bypass a
        compiled ``forward``, and blocks run compiled inside timm's activation checkpointing
        too. All blocks of a ViT share one compiled graph (their code and shapes are equal).
        """
        backbones = [self.backbone, getattr(self, "teacher_backbone", None)]
        modules: list[nn.Module] = []
        for backbone in backbones:
            blocks = getattr(backbone, "blocks", None)
            if isinstance(blocks, nn.Sequential | nn.ModuleList):
                modules.extend(blocks)
            elif isinstance(backbone, nn.Module):
                modules.append(backbone)
        return modules

    # --- teacher ----------------------------------------------------------------------------
    def create_teacher_backbone(self) -> nn.Module:
        """A frozen copy of ``backbone`` (without stochastic depth, as DINO's teacher)."""
        kwargs = dict(self.hparams.backbone_kwargs or {})
        if "drop_path_rate" in kwargs:
            kwargs["drop_path_rate"] = 0.0
        teacher = create_backbone(self.hparams.backbone, **kwargs)
        teacher.load_state_dict(self.backbone.state_dict())
        return teacher.requires_grad_(False)

    def teacher_momentum(self) -> float:
        """EMA momentum now: cosine from ``momentum`` to ``momentum_end`` (BYOL, DINO)."""
        start, end = self.hparams.momentum, self.hparams.momentum_end
        return cosine_ramp(self.global_step, self.total_steps, start, end)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher ← momentum · teacher + (1 − momentum) · online`` for every teacher pair."""
        for online, teacher in self.teacher_pairs():
            teacher_params = list(teacher.parameters())
            online_params = [p.detach() for p in online.parameters()]
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, online_params, alpha=1.0 - momentum)

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last and stage == "fit":
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit":
            for module in self.modules_to_compile():
                module.compile()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = param_groups(self.named_parameters(), self.no_weight_decay(), self.lr_scales())
        return create_optimizer(
            self.hparams.optimizer,
            groups,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.adam_betas),
        )

    def on_train_start(self) -> None:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        batches = trainer.num_training_batches
        if not math.isfinite(total):
            raise ScratchpathError("trainer: set max_epochs or max_steps (the run has no end)")
        if math.isfinite(batches):
            self.steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        elif self.hparams.warmup_epochs > 0:
            raise ScratchpathError("warmup_epochs: the training loader has no length, use 0")
        self.total_steps = int(total)
        # this run's process group: nothing left in flight from an earlier fit of this module
        self._nonfinite_check = CrossRankCheck(self.hparams.nonfinite_check_every)
        # seed_everything's seed (the recipe's seed_everything), the root of every step's stream.
        self._run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def current_lr_and_weight_decay(self) -> tuple[float, float]:
        """The scheduled LR and weight decay of the current optimiser step."""
        hp = self.hparams
        peak = scaled_lr(hp.lr, self.global_batch, hp.lr_reference_batch)
        warmup = round(hp.warmup_epochs * self.steps_per_epoch)
        lr = warmup_cosine(self.global_step, self.total_steps, peak, hp.min_lr, warmup)
        wd_end = hp.weight_decay if hp.weight_decay_end is None else hp.weight_decay_end
        return lr, cosine_ramp(self.global_step, self.total_steps, hp.weight_decay, wd_end)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.global_batch:
            trainer = self.trainer
            per_device = len(batch["views"][0])
            self.global_batch = per_device * trainer.world_size * trainer.accumulate_grad_batches
            rank_zero_info(
                f"{self.objective_name}: global batch {self.global_batch}, peak lr "
                f"{self.hparams.lr} × {self.global_batch}/{self.hparams.lr_reference_batch}"
            )
        self._step_at_batch_start = self.global_step
        self.seed_step(batch_idx)
        lr, weight_decay = self.current_lr_and_weight_decay()
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0
        if self._is_logging_step():
            self.log("train/lr", lr)
            self.log("train/wd", weight_decay)
            if self.teacher_pairs():
                self.log("train/momentum", self.teacher_momentum())

    def seed_step(self, batch_idx: int) -> None:
        """Seed torch's global stream (MAE masks, drop-path, dropout) for this batch from
        (run seed, rank, epoch, batch): different on every rank (not one mask per global batch
        position on all ranks), the same when the run is repeated, and exact after a resume."""
        entropy = [self._run_seed, self.global_rank, self.current_epoch, batch_idx, 3]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def _is_logging_step(self) -> bool:
        # a logged Python number is a host-to-device copy: log them on these steps only
        return is_logging_step(self.trainer)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch["views"])
        self._track_nonfinite(loss.detach())
        self.log("train/loss", loss, batch_size=len(batch["views"][0]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: decisions are taken after optimiser steps
        result = self._nonfinite_check.poll(self.global_step, self._nonfinite_payload)
        error = self._nonfinite_error(result)
        if error is not None:
            raise error  # on every rank at this step: they all read the same reduction

    def on_train_end(self) -> None:
        # Every rank gets here at the same step: one last (waiting) reduction of the losses.
        self._nonfinite_check.pending()
        error = self._nonfinite_error(self._nonfinite_check.now(self._nonfinite_payload()))
        if error is not None:
            raise error

    def configure_callbacks(self) -> list[L.Callback]:
        return [_NonFiniteFirst()]

    # --- the non-finite-loss stop, without a per-step host sync -------------------------------
    def _track_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember (on the device) the first step whose loss is not finite, and its kind."""
        state = self._nonfinite
        if state is None or state.device != loss.device:
            state = torch.full((4,), math.inf, dtype=torch.float64, device=loss.device)
        step = torch.full((), float(self.global_step), dtype=torch.float64, device=loss.device)
        loss = loss.double()
        kinds = (torch.isnan(loss), loss == math.inf, loss == -math.inf)
        seen = torch.stack([step, *(torch.where(kind, step, math.inf) for kind in kinds)])
        first_bad = ~torch.isfinite(loss) & torch.isinf(state[0])
        self._nonfinite = torch.where(first_bad, seen, state)

    def _nonfinite_payload(self) -> torch.Tensor:
        """What the ranks reduce (maximum): minus the first non-finite step of each kind."""
        if self._nonfinite is None:  # no step yet: on the device all the same (NCCL needs it)
            return torch.full((4,), -math.inf, dtype=torch.float64, device=self.device)
        return -self._nonfinite

    @staticmethod
    def _nonfinite_error(result: np.ndarray | None, also: str = "") -> ScratchpathError | None:
        """The error naming the first non-finite step in a reduced payload, if there is one
        (``also``: what else to say, before the advice)."""
        if result is None or not math.isfinite(-result[0]):
            return None
        first = -result[0]
        kind = next(
            (name for name, s in zip(("nan", "inf", "-inf"), -result[1:4], strict=True)
             if s == first), "not finite",
        )  # fmt: skip
        return ScratchpathError(
            f"step {int(first)}: loss is {kind} (non-finite here or on another rank){also}; "
            "lower lr, lengthen warm-up or use 32-bit precision"
        )

    def _local_nonfinite_error(self) -> ScratchpathError | None:
        """The error of the run so far as this rank alone knows it (the reduction in flight and
        its own losses), waiting for the device and starting no collective: for failures, where
        the other ranks may not be there to answer."""
        payloads = [self._nonfinite_check.pending(), HostCopy(self._nonfinite_payload()).values()]
        found = [p for p in payloads if p is not None]
        return self._nonfinite_error(np.maximum.reduce(found))

    def _refuse_nonfinite_weights(self) -> None:
        """Raise instead of saving when any parameter or buffer is not finite on any rank
        (a collective of every rank's save, and one device synchronisation per checkpoint)."""
        tensors = [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
        payload = self._nonfinite_payload().to(bad.device)
        result = self._nonfinite_check.now(torch.cat([bad.double().view(1), payload]))
        if not result[0]:
            return
        step = self.global_step
        refused = f"; the weights at step {step} are not finite, so no checkpoint is written"
        error = self._nonfinite_error(result[1:], also=refused)
        raise error or ScratchpathError(f"step {step}: no non-finite loss{refused}")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.teacher_pairs():
            self.update_teacher(self.teacher_momentum())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._refuse_nonfinite_weights()  # before anything is written
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        checkpoint["scratchpath"] = {
            "version": CHECKPOINT_VERSION,
            "objective": self.objective_name,
            "backbone": self.hparams.backbone,
            "backbone_kwargs": dict(self.hparams.backbone_kwargs or {}),
            "global_step": self.global_step,
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "config": _resolved_config(trainer),
            "git_sha": _git_sha(),
            "init": self.init_record,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights are now the checkpoint's: so is the story of how they began (a run resumed
        # without its init argument stays "continued", one resumed with an init it never used
        # does not claim it). Checkpoints from before init records began from random weights.
        meta = checkpoint.get("scratchpath") or {}
        self.init_record = meta.get("init") or pre_init_record()


class _NonFiniteFirst(L.Callback):
    """When the run fails for another reason (e.g. an evaluation callback choking on the NaN
    weights a non-finite loss left before its check came round), look at the losses first: the
    error naming the non-finite step becomes ``pl_module.nonfinite_error`` and a note on the
    other error. It is not raised here: an exception out of ``on_exception`` would skip the
    Trainer's teardown (its signal handlers, the process group, the loggers)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(pl_module, SSLObjective) or isinstance(exception, ScratchpathError):
            return
        error = pl_module._local_nonfinite_error()
        if error is not None:
            pl_module.nonfinite_error = error
            exception.add_note(f"caused by a non-finite loss first: {error}")


def _resolved_config(trainer: L.Trainer) -> str | None:
    """The run's resolved YAML: set by the CLI, else LightningCLI's ``config.yaml`` in log_dir."""
    config = getattr(trainer, "scratchpath_config", None)
    if config is not None:
        return str(config)
    log_dir = trainer.log_dir
    path = Path(log_dir, "config.yaml") if log_dir else None
    return path.read_text() if path is not None and path.is_file() else None


def _git_sha() -> str | None:
    """Commit of the scratchpath source tree, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None
