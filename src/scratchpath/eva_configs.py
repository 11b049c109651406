"""The kaiko-ai/eva section of an export's model card: complete offline task configs.

eva evaluates a frozen backbone in two passes (``eva predict_fit``): *predict* embeds a dataset
with the backbone given to its embeddings writer callback, *fit* trains a head on the stored
embeddings, ``N_RUNS`` times. Its task configs live in its repository
(``configs/vision/pathology/offline/...``), not in the pip wheel, and name their backbone by
``ModelFromRegistry``, which cannot rebuild a backbone with its own ``model_args``. The two
configs here are eva's ``crc.yaml`` (patch level) and ``camelyon16_small.yaml`` (slide level,
ABMIL) with the export's backbone block in place of ``ModelFromRegistry`` and the export's
values as the defaults of eva's variables, so they run as they are
(``tests/test_eva_configs.py`` runs the CRC one through ``eva predict_fit``).

Kept in one module so the card's other sections can be templated apart from it.
"""

from __future__ import annotations

import json
from typing import Any

EVA_VERSION = "0.4.5"
EVA_CONFIGS = "https://github.com/kaiko-ai/eva/tree/{tag}/configs/vision/pathology/offline"
PLACEHOLDER = "path/to/this/folder"

_TRAINER_CALLBACKS = """\
    callbacks:
      - class_path: eva.callbacks.ConfigurationLogger
      - class_path: lightning.pytorch.callbacks.TQDMProgressBar
        init_args:
          refresh_rate: ${{oc.env:TQDM_REFRESH_RATE, 1}}
      - class_path: lightning.pytorch.callbacks.LearningRateMonitor
        init_args:
          logging_interval: epoch
      - class_path: lightning.pytorch.callbacks.ModelCheckpoint
        init_args:
          filename: best
          save_last: ${{oc.env:SAVE_LAST, false}}
          save_top_k: 1
          monitor: &MONITOR_METRIC ${{oc.env:MONITOR_METRIC, {monitor}}}
          mode: &MONITOR_METRIC_MODE ${{oc.env:MONITOR_METRIC_MODE, max}}
      - class_path: lightning.pytorch.callbacks.EarlyStopping
        init_args:
          min_delta: 0
          patience: ${{oc.env:PATIENCE, {patience}}}
          monitor: *MONITOR_METRIC
          mode: *MONITOR_METRIC_MODE
"""


def _values(config: dict[str, Any]) -> dict[str, Any]:
    pcfg, prov = config["pretrained_cfg"], config.get("scratchpath") or {}
    return {
        "arch": config["architecture"],
        # what the backbone's forward gives (timm's head_hidden_size: 2 x num_features for a
        # catavgmax CNN); exports before embedding_dim was recorded give num_features
        "in_features": prov.get("embedding_dim") or config.get("num_features"),
        "size": pcfg["input_size"][-1],
        "mean": json.dumps([float(v) for v in pcfg["mean"]]),
        "std": json.dumps([float(v) for v in pcfg["std"]]),
        "name": f"{config['architecture']}_scratchpath",
        "model_name": "${oc.env:MODEL_NAME, " + f"{config['architecture']}_scratchpath" + "}",
        "mpp": prov.get("mpp"),
        "tile": prov.get("tile_size") or pcfg["input_size"][-1],
    }


def backbone_block(config: dict[str, Any], indent: int = 0) -> str:
    """eva's ``TimmModel`` wrapper for this export (a strict load of ``model.safetensors``)."""
    kwargs = {"num_classes": 0, **(config.get("model_args") or {})}
    lines = [
        "backbone:",
        "  class_path: eva.vision.models.wrappers.TimmModel",
        "  init_args:",
        f"    model_name: {config['architecture']}",
        f"    checkpoint_path: {PLACEHOLDER}/model.safetensors",
        "    model_kwargs:",
        *(f"      {k}: {json.dumps(v)}" for k, v in kwargs.items()),  # JSON values are YAML
    ]
    return "\n".join(" " * indent + line for line in lines)


def crc_config(config: dict[str, Any]) -> str:
    """eva v0.4.5 ``offline/classification/crc.yaml`` (NCT-CRC-HE-100K, 9 tissue classes,
    linear probe) with this backbone."""
    v = _values(config)
    callbacks = _TRAINER_CALLBACKS.format(monitor="val/MulticlassAccuracy", patience=7)
    embeddings = "${oc.env:EMBEDDINGS_ROOT, ./data/embeddings}"
    return f"""---
trainer:
  class_path: eva.Trainer
  init_args:
    n_runs: &N_RUNS ${{oc.env:N_RUNS, 5}}
    default_root_dir: &OUTPUT_ROOT ${{oc.env:OUTPUT_ROOT, logs/{v["model_name"]}/offline/crc}}
    max_steps: &MAX_STEPS ${{oc.env:MAX_STEPS, 12500}}
    checkpoint_type: ${{oc.env:CHECKPOINT_TYPE, best}}
    accelerator: ${{oc.env:ACCELERATOR, auto}}
    devices: ${{oc.env:NUM_DEVICES, 1}}
{callbacks}      - class_path: eva.callbacks.ClassificationEmbeddingsWriter
        init_args:
          output_dir: &DATASET_EMBEDDINGS_ROOT {embeddings}/{v["model_name"]}/crc
          dataloader_idx_map:
            0: train
            1: val
{backbone_block(config, indent=10)}
          overwrite: false
    logger:
      - class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args:
          save_dir: *OUTPUT_ROOT
          name: ""
model:
  class_path: eva.HeadModule
  init_args:
    head:
      class_path: torch.nn.Linear
      init_args:
        in_features: ${{oc.env:IN_FEATURES, {v["in_features"]}}}
        out_features: &NUM_CLASSES 9
    criterion: torch.nn.CrossEntropyLoss
    optimizer:
      class_path: torch.optim.AdamW
      init_args:
        lr: ${{oc.env:LR_VALUE, 0.0003}}
    metrics:
      common:
        - class_path: eva.metrics.AverageLoss
        - class_path: eva.metrics.MulticlassClassificationMetrics
          init_args:
            num_classes: *NUM_CLASSES
data:
  class_path: eva.DataModule
  init_args:
    datasets:
      train:
        class_path: eva.datasets.EmbeddingsClassificationDataset
        init_args: &DATASET_ARGS
          root: *DATASET_EMBEDDINGS_ROOT
          manifest_file: manifest.csv
          split: train
      val:
        class_path: eva.datasets.EmbeddingsClassificationDataset
        init_args:
          <<: *DATASET_ARGS
          split: val
      predict:
        - class_path: eva.vision.datasets.CRC
          init_args: &PREDICT_DATASET_ARGS
            root: ${{oc.env:DATA_ROOT, ./data/crc}}
            split: train
            download: ${{oc.env:DOWNLOAD_DATA, false}}
            transforms:
              class_path: eva.vision.data.transforms.common.ResizeAndCrop
              init_args:
                size: ${{oc.env:RESIZE_DIM, {v["size"]}}}
                mean: ${{oc.env:NORMALIZE_MEAN, {v["mean"]}}}
                std: ${{oc.env:NORMALIZE_STD, {v["std"]}}}
        - class_path: eva.vision.datasets.CRC
          init_args:
            <<: *PREDICT_DATASET_ARGS
            split: val
    dataloaders:
      train:
        batch_size: &BATCH_SIZE ${{oc.env:BATCH_SIZE, 256}}
        num_workers: &N_DATA_WORKERS ${{oc.env:N_DATA_WORKERS, 4}}
        prefetch_factor: &PREFETCH_FACTOR ${{oc.env:PREFETCH_FACTOR, 2}}
        persistent_workers: &PERSISTENT_WORKERS ${{oc.env:PERSISTENT_WORKERS, true}}
        shuffle: true
      val:
        batch_size: *BATCH_SIZE
        num_workers: *N_DATA_WORKERS
        prefetch_factor: *PREFETCH_FACTOR
        persistent_workers: *PERSISTENT_WORKERS
      predict:
        batch_size: &PREDICT_BATCH_SIZE ${{oc.env:PREDICT_BATCH_SIZE, 64}}
        num_workers: *N_DATA_WORKERS
        prefetch_factor: *PREFETCH_FACTOR
        persistent_workers: *PERSISTENT_WORKERS
"""


def camelyon16_config(config: dict[str, Any]) -> str:
    """eva v0.4.5 ``offline/classification/camelyon16_small.yaml`` (metastasis per slide, ABMIL
    on up to ``N_PATCHES`` tiles per slide) with this backbone, its tiles cut at the export's
    training µm/px and tile size."""
    v = _values(config)
    callbacks = _TRAINER_CALLBACKS.format(monitor="val/BinaryBalancedAccuracy", patience=20)
    output = "${oc.env:OUTPUT_ROOT, logs/" + v["model_name"] + "/offline/camelyon16}"
    embeddings = "${oc.env:EMBEDDINGS_ROOT, ./data/embeddings/" + v["model_name"] + "/camelyon16}"
    mpp = v["mpp"] if v["mpp"] is not None else 0.25
    return f"""---
trainer:
  class_path: eva.Trainer
  init_args:
    n_runs: &N_RUNS ${{oc.env:N_RUNS, 20}}
    default_root_dir: &OUTPUT_ROOT {output}
    max_epochs: &MAX_EPOCHS ${{oc.env:MAX_EPOCHS, 100}}
    checkpoint_type: ${{oc.env:CHECKPOINT_TYPE, best}}
    accelerator: ${{oc.env:ACCELERATOR, auto}}
    devices: ${{oc.env:NUM_DEVICES, 1}}
{callbacks}      - class_path: eva.callbacks.ClassificationEmbeddingsWriter
        init_args:
          output_dir: &DATASET_EMBEDDINGS_ROOT {embeddings}
          save_every_n: 10_000
          dataloader_idx_map:
            0: train
            1: val
            2: test
          metadata_keys: ["wsi_id"]
{backbone_block(config, indent=10)}
          overwrite: false
    logger:
      - class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args:
          save_dir: *OUTPUT_ROOT
          name: ""
model:
  class_path: eva.HeadModule
  init_args:
    head:
      class_path: eva.vision.models.networks.ABMIL
      init_args:
        input_size: ${{oc.env:IN_FEATURES, {v["in_features"]}}}
        output_size: &NUM_CLASSES 1
        projected_input_size: 128
    criterion: torch.nn.BCEWithLogitsLoss
    optimizer:
      class_path: torch.optim.AdamW
      init_args:
        lr: ${{oc.env:LR_VALUE, 0.001}}
        betas: [0.9, 0.999]
    metrics:
      common:
        - class_path: eva.metrics.AverageLoss
        - class_path: eva.metrics.BinaryClassificationMetrics
data:
  class_path: eva.DataModule
  init_args:
    datasets:
      train:
        class_path: eva.datasets.MultiEmbeddingsClassificationDataset
        init_args: &DATASET_ARGS
          root: *DATASET_EMBEDDINGS_ROOT
          manifest_file: manifest.csv
          split: train
          embeddings_transforms:
            class_path: eva.core.data.transforms.Pad2DTensor
            init_args:
              pad_size: &N_PATCHES ${{oc.env:N_PATCHES, 1000}}
          target_transforms:
            class_path: eva.core.data.transforms.dtype.ArrayToFloatTensor
      val:
        class_path: eva.datasets.MultiEmbeddingsClassificationDataset
        init_args:
          <<: *DATASET_ARGS
          split: val
      test:
        class_path: eva.datasets.MultiEmbeddingsClassificationDataset
        init_args:
          <<: *DATASET_ARGS
          split: test
      predict:
        - class_path: eva.vision.datasets.Camelyon16
          init_args: &PREDICT_DATASET_ARGS
            root: ${{oc.env:DATA_ROOT, ./data/camelyon16}}
            sampler:
              class_path: eva.vision.data.wsi.patching.samplers.ForegroundGridSampler
              init_args:
                max_samples: *N_PATCHES
            width: {v["tile"]}
            height: {v["tile"]}
            target_mpp: {mpp}
            split: train
            coords_path: ${{data.init_args.datasets.train.init_args.root}}/coords_${{.split}}.csv
            image_transforms:
              class_path: eva.vision.data.transforms.common.ResizeAndCrop
              init_args:
                size: ${{oc.env:RESIZE_DIM, {v["size"]}}}
                mean: ${{oc.env:NORMALIZE_MEAN, {v["mean"]}}}
                std: ${{oc.env:NORMALIZE_STD, {v["std"]}}}
        - class_path: eva.vision.datasets.Camelyon16
          init_args:
            <<: *PREDICT_DATASET_ARGS
            split: val
        - class_path: eva.vision.datasets.Camelyon16
          init_args:
            <<: *PREDICT_DATASET_ARGS
            split: test
    dataloaders:
      train:
        batch_size: &BATCH_SIZE ${{oc.env:BATCH_SIZE, 32}}
        num_workers: &N_DATA_WORKERS ${{oc.env:N_DATA_WORKERS, 4}}
        prefetch_factor: &PREFETCH_FACTOR ${{oc.env:PREFETCH_FACTOR, 2}}
        persistent_workers: &PERSISTENT_WORKERS ${{oc.env:PERSISTENT_WORKERS, true}}
        shuffle: true
      val:
        batch_size: *BATCH_SIZE
        num_workers: *N_DATA_WORKERS
        prefetch_factor: *PREFETCH_FACTOR
        persistent_workers: *PERSISTENT_WORKERS
      test:
        batch_size: *BATCH_SIZE
        num_workers: *N_DATA_WORKERS
        prefetch_factor: *PREFETCH_FACTOR
        persistent_workers: *PERSISTENT_WORKERS
      predict:
        batch_size: &PREDICT_BATCH_SIZE ${{oc.env:PREDICT_BATCH_SIZE, 64}}
        num_workers: *N_DATA_WORKERS
        prefetch_factor: *PREFETCH_FACTOR
        persistent_workers: *PERSISTENT_WORKERS
"""


def eva_section(config: dict[str, Any]) -> str:
    """The card's eva section: where the backbone goes, which variables to set, and the two
    complete configs (``eva-crc.yaml``, ``eva-camelyon16_small.yaml`` blocks)."""
    v = _values(config)
    kwargs = config.get("model_args") or {}
    tag = f"v{EVA_VERSION}"
    mpp = v["mpp"]
    crc_note = (
        "CRC's tiles are 224 px at 0.5 µm/px"
        + (
            f"; this backbone was trained at {mpp:g} µm/px, so expect it to read them as "
            "another magnification"
            if isinstance(mpp, int | float) and abs(mpp / 0.5 - 1) > 0.05
            else ""
        )
        + "."
    )
    registry = (
        f"eva's registry route (`MODEL_NAME=timm/{v['arch']} MODEL_EXTRA_KWARGS=...`) passes "
        "only `checkpoint_path` on to timm, so it cannot rebuild this backbone's `model_args` "
        f"{json.dumps(kwargs)}: use the block above."
        if kwargs
        else "eva's registry route also works for this stock timm architecture: "
        f"`MODEL_NAME=timm/{v['arch']} MODEL_EXTRA_KWARGS="
        f"'{json.dumps({'checkpoint_path': f'{PLACEHOLDER}/model.safetensors'})}'`."
    )
    return f"""### kaiko's eva
eva's task configs come from its repository, not from its wheel (`pip install kaiko-eva`
installs the code only): its offline configs are in
[{EVA_CONFIGS.format(tag=tag)}]({EVA_CONFIGS.format(tag=tag)}). In any of them, put this
backbone **under the embeddings writer** (`trainer.init_args.callbacks`:
`eva.callbacks.ClassificationEmbeddingsWriter` -> `init_args.backbone`), **in place of
`eva.vision.models.ModelFromRegistry`**:
```yaml
{backbone_block(config)}
```
{registry}
Set eva's variables to this export's values:

| variable | value | why |
|---|---|---|
| `IN_FEATURES` | `{v["in_features"]}` | the head's input: this backbone's embedding size |
| `RESIZE_DIM` | `{v["size"]}` | the input size it was trained at |
| `NORMALIZE_MEAN` | `{v["mean"]}` | its training normalisation |
| `NORMALIZE_STD` | `{v["std"]}` | |
| `MODEL_NAME` | e.g. `{v["name"]}` | names the output folders only (the registry is not used) |
| `PREFETCH_FACTOR` | `null` with `N_DATA_WORKERS=0` | added here: eva's configs pass both |
| `PERSISTENT_WORKERS` | `false` with `N_DATA_WORKERS=0` | to torch, which refuses them alone |

e.g. `IN_FEATURES={v["in_features"]} RESIZE_DIM={v["size"]} NORMALIZE_MEAN='{v["mean"]}' \
NORMALIZE_STD='{v["std"]}' MODEL_NAME={v["name"]} eva predict_fit --config your_task.yaml`.

The two configs below are eva {tag}'s `classification/crc.yaml` (patch level: 9 colorectal
tissue classes, linear probe) and `classification/camelyon16_small.yaml` (slide level: lymph
node metastasis, ABMIL on up to `N_PATCHES` tiles per slide, cut at {mpp if mpp else 0.25} µm/px
in {v["tile"]} px tiles as this backbone was trained) with the block above in place and these
values as defaults: save one as a file, replace `{PLACEHOLDER}`, point `DATA_ROOT` at the
dataset (eva's layout; `DOWNLOAD_DATA=true` fetches CRC) and run
`eva predict_fit --config crc.yaml`. {crc_note}
```yaml
{crc_config(config).rstrip()}
```
```yaml
{camelyon16_config(config).rstrip()}
```
Or load the backbone through scratchpath itself (in place of the block above):
```yaml
backbone:
  class_path: eva.core.models.wrappers.ModelFromFunction
  init_args:
    path: scratchpath.load_backbone
    arguments:
      model_dir: {PLACEHOLDER}
```
"""
