"""The model card (``README.md``) of an export, rendered from ``model_card.md`` (a
:class:`string.Template`) and the export's ``config.json`` content; its eva section (complete
eva task configs) is :func:`scratchpath.eva_configs.eva_section`."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

from scratchpath.eva_configs import eva_section
from scratchpath.export.config import mpp_text, origin_text
from scratchpath.weights import describe_init, is_from_scratch, pre_init_record

_TEMPLATE = Path(__file__).with_name("model_card.md")


def render_model_card(config: dict[str, Any]) -> str:
    """The ``README.md`` model card of an export, from its ``config.json`` content.

    Every Python snippet in it runs as written once ``path/to/this/folder`` is the export
    (``tests/test_export_clients.py`` runs them all).
    """
    arch, kwargs = config["architecture"], config.get("model_args") or {}
    prov = config.get("scratchpath") or {}
    pcfg = config["pretrained_cfg"]
    init = prov.get("init") or pre_init_record()
    stores = prov.get("stores") or []
    store_lines = "\n".join(
        f"- `{s.get('path')}` ({s.get('n_tiles')} tiles, fingerprint `{s.get('fingerprint')}`)"
        for s in stores
    )
    sha = prov.get("git_sha")
    scratch = is_from_scratch(init)
    return Template(_TEMPLATE.read_text()).substitute(
        arch=arch,
        title_origin=origin_text(init),
        trained_from=(
            "trained from random initialisation on H&E histopathology tiles only"
            if scratch
            else "started from given weights (below: NOT from scratch) and trained on H&E "
            "histopathology tiles"
        ),
        init_text=describe_init(init)
        + (
            "."
            if scratch
            else ". Compare it with its from-scratch "
            "twin before crediting the H&E pretraining (`scratchpath "
            "compare`)."
        ),
        seen_before="" if scratch else " (and whatever its initial weights were trained on)",
        objective=prov.get("objective"),
        num_features=prov.get("embedding_dim") or config.get("num_features"),
        weights=prov.get("weights"),
        global_step=prov.get("global_step"),
        commit=f"git commit `{sha}`"
        if sha
        else "an unrecorded git commit (not run from a checkout)",
        version=prov.get("scratchpath_version"),
        size=pcfg["input_size"][-1],
        mpp_text=mpp_text(prov.get("mpp")),
        tile_size=prov.get("tile_size"),
        mean=pcfg["mean"],
        std=pcfg["std"],
        normalisation_source=prov.get("normalisation_source"),
        interpolation=pcfg["interpolation"],
        store_lines=store_lines or "- (no store information recorded)",
        kw="".join(f", {k}={v!r}" for k, v in kwargs.items()),
        # eva's section is text of its own (eva_configs.py: complete task configs); its
        # trailing newline is the template's last one
        eva_section=eva_section(config).rstrip("\n"),
    )
