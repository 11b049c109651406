"""``recipes/torchrun_multinode.sh`` for real: two "nodes" of one process each on loopback
(two runs of the script, as on two machines, meeting at a c10d rendezvous on 127.0.0.1; DDP over
gloo on CPU) train the SimCLR smoke recipe. Each rank records the tiles it trained on and its
final weights (``tests/rank_probe.py``): the ranks saw disjoint tiles and end with equal weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3_helpers import free_port
from scratchpath.store import import_tiles

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
BATCH = 8  # per rank


@pytest.mark.slow
def test_two_nodes_on_loopback_train_on_disjoint_tiles_to_equal_weights(
    tiles_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "smoke_store"
    import_tiles(
        tiles_dir / "deeptexture_examples_unlabeled_256" / "unlabeled", store, tile_size=64
    )
    probe = [{"class_path": "rank_probe.RecordRank", "init_args": {"out": str(tmp_path / "ranks")}}]
    python_path = os.pathsep.join(
        [str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": python_path,
            "RECIPE": str(REPO / "recipes" / "smoke_simclr.yaml"),
            "STORES": f"[{store}]",
            "RUN_DIR": "runs/torchrun",  # made absolute from the working folder
            "NNODES": "2",
            "NODE_RANK": str(node_rank),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RDZV_ID": f"scratchpath-tests-{port}",
            "GLOO_SOCKET_IFNAME": "lo",  # the loopback "network" between the two nodes
        }
        nodes.append(
            subprocess.Popen(
                [
                    "bash",
                    str(REPO / "recipes" / "torchrun_multinode.sh"),
                    f"--trainer.callbacks={json.dumps(probe)}",
                    "--trainer.max_steps",
                    str(STEPS),
                    "--data.batch_size",
                    str(BATCH),
                    "--data.num_workers",
                    "0",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=900)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    tiles = [r["tiles"] for r in ranks]
    assert [len(t) for t in tiles] == [STEPS * BATCH, STEPS * BATCH]
    assert not set(tiles[0]) & set(tiles[1])  # each tile of an epoch goes to one rank only
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    checkpoint = torch.load(tmp_path / "runs/torchrun/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert "starting fresh" in outputs[0] + outputs[1]  # first start: last-or-fresh said so
