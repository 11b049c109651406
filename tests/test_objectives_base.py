"""Shared objective machinery: schedules, LR scaling, weight-decay groups, stops, checkpoints."""

from __future__ import annotations

import itertools
import math
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.optim import Lars
from torch.utils.data import DataLoader

from objective_helpers import one_torch_thread  # noqa: F401
from scratchpath.callbacks import PreemptionCheckpoint
from scratchpath.errors import ScratchpathError
from scratchpath.objectives import DINO, MAE, OBJECTIVES, DINOv2, MoCoV3, SimCLR
from scratchpath.objectives.optim import cosine_ramp, warmup_cosine

TINY_VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1},
}
SMALL_HEAD = {"proj_hidden_dim": 32, "proj_out_dim": 16}


def synthetic_batch(batch_size: int = 4, n_views: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, 32, 32, generator=generator) for _ in range(n_views)]
    return {"views": views, "index": torch.arange(batch_size)}


def fit(module: L.LightningModule, batches: list[dict], **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_warmup_cosine_rises_linearly_then_decays_to_end():
    values = [warmup_cosine(step, 110, peak=1.0, end=0.1, warmup_steps=10) for step in range(111)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)  # halfway through the cosine
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_cosine_ramp_goes_from_start_to_end():
    assert cosine_ramp(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_ramp(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_ramp(100, 100, 0.04, 0.4) == pytest.approx(0.4)


def test_lr_is_scaled_by_batch_times_devices_times_accumulation():
    module = SimCLR(
        **TINY_VIT, **SMALL_HEAD, lr=1e-3, lr_reference_batch=256, warmup_epochs=0, min_lr=0.0
    )
    trainer = fit(module, [synthetic_batch(4)] * 2, max_steps=1, accumulate_grad_batches=2)
    assert module.global_batch == 4 * 1 * 2
    # After one optimiser step the LR set for that step (step 0, no warm-up) is the scaled peak.
    lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
    assert lrs == [pytest.approx(1e-3 * 8 / 256)] * 2


def test_schedules_are_applied_per_step_during_fit():
    module = SimCLR(
        **TINY_VIT, **SMALL_HEAD, lr=1e-3, lr_reference_batch=4, min_lr=1e-5,
        warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
    )  # fmt: skip
    seen: list[tuple[float, float]] = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            decayed = next(g for g in optimizer.param_groups if g["apply_weight_decay"])
            seen.append((decayed["lr"], decayed["weight_decay"]))

    fit(module, [synthetic_batch(4)] * 2, max_epochs=3, callbacks=[Record()])
    # 2 steps per epoch, 6 in all, warm-up 2 steps
    expected = [
        (warmup_cosine(step, 6, 1e-3, 1e-5, 2), cosine_ramp(step, 6, 0.04, 0.4))
        for step in range(6)
    ]
    assert seen == [(pytest.approx(lr), pytest.approx(wd)) for lr, wd in expected]


def test_no_weight_decay_on_biases_norms_positions_and_tokens():
    module = SimCLR(**TINY_VIT, **SMALL_HEAD, weight_decay=0.05)
    optimizer = module.configure_optimizers()
    by_id = {id(p): name for name, p in module.named_parameters()}
    decayed = {
        by_id[id(p)] for g in optimizer.param_groups if g["apply_weight_decay"] for p in g["params"]
    }
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight",
                 "backbone.blocks.0.attn.qkv.bias", "projector.1.weight"):  # fmt: skip
        assert name not in decayed
    assert "backbone.blocks.0.attn.qkv.weight" in decayed
    assert "projector.0.weight" in decayed


def test_lars_uses_timm_lars_and_adapts_only_decayed_parameters():
    module = SimCLR(**TINY_VIT, **SMALL_HEAD, optimizer="lars")
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, Lars)
    assert {g["apply_weight_decay"]: g["always_adapt"] for g in optimizer.param_groups} == {
        True: True,
        False: False,
    }


def test_nonfinite_loss_stops_the_run_naming_the_step():
    class Diverging(SimCLR):
        def compute_loss(self, views):
            loss = super().compute_loss(views)
            return loss * float("nan") if self.global_step == 1 else loss

    module = Diverging(**TINY_VIT, **SMALL_HEAD, warmup_epochs=0)
    with pytest.raises(ScratchpathError, match="step 1: loss is nan"):
        fit(module, [synthetic_batch(4)] * 3, max_steps=3)


def test_failure_after_a_nonfinite_loss_names_the_step_and_still_tears_down():
    """An error elsewhere (here a callback choking on the NaN weights) before the next check:
    the error carries the non-finite step, and the Trainer's teardown still restores the
    signal handlers it replaced."""

    class Diverging(SimCLR):
        def compute_loss(self, views):
            loss = super().compute_loss(views)
            return loss * float("nan") if self.global_step == 1 else loss

    class ChokesOnNaN(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not all(p.isfinite().all() for p in pl_module.parameters()):
                raise RuntimeError("evaluation on NaN weights")

    sigterm = signal.getsignal(signal.SIGTERM)
    module = Diverging(**TINY_VIT, **SMALL_HEAD, warmup_epochs=0)
    with pytest.raises(RuntimeError, match="NaN weights") as raised:
        fit(module, [synthetic_batch(4)] * 6, max_steps=6, callbacks=[ChokesOnNaN()])
    assert "step 1: loss is nan" in "".join(raised.value.__notes__)
    assert "step 1: loss is nan" in str(module.nonfinite_error)
    assert signal.getsignal(signal.SIGTERM) is sigterm


def test_checkpoint_records_provenance(tmp_path):
    class TinyData(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader([synthetic_batch(4)], batch_size=None)

        def describe(self):
            return {"mpp": 0.5, "tile_size": 32, "stores": []}

    module = SimCLR(**TINY_VIT, **SMALL_HEAD)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.scratchpath_config = "model:\n  class_path: SimCLR\n"
    trainer.fit(module, datamodule=TinyData())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    record = checkpoint["scratchpath"]
    assert record["objective"] == "simclr"
    assert record["backbone"] == "vit_tiny_patch16_224"
    assert record["backbone_kwargs"] == TINY_VIT["backbone_kwargs"]
    assert record["global_step"] == 1
    assert record["data"] == {"mpp": 0.5, "tile_size": 32, "stores": []}
    assert record["config"] == "model:\n  class_path: SimCLR\n"
    assert record["git_sha"] is None or len(record["git_sha"]) == 40
    assert any(key.startswith("backbone.") for key in checkpoint["state_dict"])


def test_compile_keeps_state_dict_keys():
    module = SimCLR(**TINY_VIT, **SMALL_HEAD, compile=True)
    keys = set(module.state_dict())
    module.setup("fit")  # compiles lazily in place: nothing runs until the first forward
    assert set(module.state_dict()) == keys


DINO_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
COMPILE_CASES = {
    "simclr": lambda **kw: SimCLR(**TINY_VIT, **SMALL_HEAD, **kw),
    "mocov3": lambda **kw: MoCoV3(**TINY_VIT, **SMALL_HEAD, **kw),
    "dino": lambda **kw: DINO(**TINY_VIT, **DINO_HEAD, **kw),
    "dinov2": lambda **kw: DINOv2(**TINY_VIT, **DINO_HEAD, **kw),
    "mae": lambda **kw: MAE(**TINY_VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, **kw),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compile_runs_the_backbones_compiled_for_every_objective(name, monkeypatch):
    """``compile: true`` must compile what the objective runs: in one training step (dynamo with
    the eager backend: graphs are captured, not optimised) dynamo captures frames, and every
    transformer block of the student backbone, and of the EMA teacher where there is one, is
    called through its compiled entry point (not bypassed by the objective's own token path)."""
    from torch._dynamo.utils import counters

    ran_compiled: set[int] = set()
    original = torch.nn.Module.compile

    def compile_eager(self: torch.nn.Module) -> None:
        original(self, backend="eager")
        entry = self._compiled_call_impl  # what Module.__call__ runs once compiled

        def counted(*args, **kwargs):
            ran_compiled.add(id(self))
            return entry(*args, **kwargs)

        self._compiled_call_impl = counted

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    torch._dynamo.reset()
    counters.clear()
    try:
        module = COMPILE_CASES[name](compile=True, warmup_epochs=0)
        fit(module, [synthetic_batch(4)], max_steps=1)
        frames = counters["frames"]["ok"]
    finally:
        torch._dynamo.reset()
    assert frames >= 1, f"{name}: dynamo captured no frame"
    backbones = [module.backbone, getattr(module, "teacher_backbone", None)]
    blocks = [block for vit in backbones if vit is not None for block in vit.blocks]
    assert all(id(block) in ran_compiled for block in blocks)


def test_objectives_registry_names_match_classes():
    assert {
        "simclr": SimCLR, "mocov3": MoCoV3, "dino": DINO, "dinov2": DINOv2, "mae": MAE,
    } == OBJECTIVES  # fmt: skip
    assert all(cls.objective_name == name for name, cls in OBJECTIVES.items())


def test_hparams_include_base_and_objective_arguments():
    module = SimCLR(**TINY_VIT, **SMALL_HEAD, lr=0.3, optimizer="lars")
    assert module.hparams.backbone == "vit_tiny_patch16_224"
    assert module.hparams.lr == 0.3 and module.hparams.proj_out_dim == 16
    assert math.isclose(module.hparams.temperature, 0.1)


def test_nonfinite_loss_is_seen_at_the_next_check_and_named_by_its_step():
    seen_steps: list[int] = []

    class Diverging(SimCLR):
        def compute_loss(self, views):
            seen_steps.append(self.global_step)
            loss = super().compute_loss(views)
            return loss * float("inf") if self.global_step == 2 else loss

    module = Diverging(**TINY_VIT, **SMALL_HEAD, warmup_epochs=0, nonfinite_check_every=3)
    with pytest.raises(ScratchpathError, match="step 2: loss is inf"):
        fit(module, [synthetic_batch(4)] * 20, max_steps=20)
    # Decided at fixed steps (every 3): the reduction started after step 3 (holding step 2's
    # loss) is read after step 6, on every rank alike, and the run stops there.
    assert seen_steps == [0, 1, 2, 3, 4, 5]


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path):
    """Loss NaN at step 2, a checkpoint every 4 steps, the non-finite check every 4: the save
    at step 4 is refused (it would hold NaN weights, and ``--ckpt_path last`` would resume into
    them), the run stops naming step 2, and the finite ``last.ckpt`` of before stays as it was."""

    class Diverging(SimCLR):
        def compute_loss(self, views):
            loss = super().compute_loss(views)
            return loss * float("nan") if self.global_step == 2 else loss

    folder = tmp_path / "checkpoints"

    def trainer(max_steps: int) -> L.Trainer:
        every_4 = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=4)
        return L.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[every_4, PreemptionCheckpoint()],
        )  # fmt: skip

    options = {**TINY_VIT, **SMALL_HEAD, "warmup_epochs": 0, "nonfinite_check_every": 4}
    loader = DataLoader([synthetic_batch(4)] * 8, batch_size=None)
    trainer(2).fit(SimCLR(**options), loader)  # finite: last.ckpt at step 2
    last = folder / "last.ckpt"
    finite = last.read_bytes()
    with pytest.raises(ScratchpathError, match="step 2: loss is nan") as raised:
        trainer(8).fit(Diverging(**options), loader, ckpt_path=last)  # resumed at step 2
    assert "; the weights at step 4 are not finite, so no checkpoint is written; lower lr" in str(
        raised.value
    )
    assert last.read_bytes() == finite
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]


def test_a_save_of_nonfinite_weights_is_refused_without_a_nonfinite_loss(tmp_path):
    module = SimCLR(**TINY_VIT, **SMALL_HEAD)
    trainer = fit(module, [synthetic_batch(4)], max_steps=1)
    with torch.no_grad():
        module.backbone.cls_token[0, 0, 0] = float("inf")
    refused = "step 1: no non-finite loss; the weights at step 1 are not finite"
    with pytest.raises(ScratchpathError, match=refused):
        trainer.save_checkpoint(tmp_path / "inf.ckpt")
    assert not list(tmp_path.iterdir())


def test_nonfinite_check_every_must_be_positive():
    with pytest.raises(ScratchpathError, match="nonfinite_check_every"):
        SimCLR(**TINY_VIT, **SMALL_HEAD, nonfinite_check_every=0)


SLIM_RESNET = {"backbone": "resnet10t", "backbone_kwargs": {"channels": [8, 8, 16, 16]}}


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4]


def test_channels_last_puts_4d_weights_in_nhwc_order_for_fit_only():
    default = SimCLR(**SLIM_RESNET, **SMALL_HEAD)
    default.setup("fit")
    assert all(w.is_contiguous() for w in _conv_weights(default))
    nhwc = SimCLR(**SLIM_RESNET, **SMALL_HEAD, channels_last=True)
    nhwc.setup("validate")  # only fit converts
    assert all(w.is_contiguous() for w in _conv_weights(nhwc))
    nhwc.setup("fit")
    weights = _conv_weights(nhwc)
    assert weights and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for w in weights
        if w.shape[2:] != (1, 1)  # a 1x1 kernel is both
    )


def test_channels_last_changes_the_memory_order_not_the_step():
    """One training step from the same weights gives the same loss and gradients either way."""
    batch = synthetic_batch(batch_size=8)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = SimCLR(**SLIM_RESNET, **SMALL_HEAD, channels_last=channels_last)
        module.setup("fit")
        loss = module.compute_loss(batch["views"])
        loss.backward()
        grads = {n: p.grad.contiguous() for n, p in module.named_parameters()}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grads_a:  # equal up to float32 summation order (~1e-5 of the gradient's scale)
        scale = grads_a[name].abs().max()
        assert (grads_a[name] - grads_b[name]).abs().max() <= 1e-4 * scale, name
