"""MAE: masked autoencoders (He et al. 2022, arXiv:2111.06377) on a timm Vision Transformer."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from scratchpath.backbones import feature_dim
from scratchpath.errors import ScratchpathError
from scratchpath.objectives.base import SSLObjective

_VIT_PARTS = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, L, p·p·C)`` patches in row-major order (ViT's token order)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image uniform random masking of ``round(L · mask_ratio)`` patches (MAE §3).

    Returns:
        ids_keep ``(B, L_visible)`` indices of the visible patches, mask ``(B, L)`` (1 = masked)
        and ids_restore ``(B, L)`` that un-shuffles ``[visible, masked]`` back to patch order.
    """
    num_visible = num_patches - round(num_patches * mask_ratio)
    noise = torch.rand(batch, num_patches, device=device)  # (B, L)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_visible].zero_()  # a fill: no tensor made from a Python number
    return ids_shuffle[:, :num_visible], mask.gather(1, ids_restore), ids_restore


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error on masked patches only.

    Args:
        pred, target: ``(B, L, P)`` predicted and true patch pixels.
        mask: ``(B, L)``, 1 for masked patches (the only ones that count).
        norm_pix: normalise each target patch by its own mean and variance (MAE's best variant).

    Computed in float32 even under bf16 autocast.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred, target, mask = pred.float(), target.float(), mask.float()
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()


class MAE(SSLObjective):
    """MAE: a ViT encodes the visible 25 % of patches, a light decoder reconstructs the rest.

    Uses the timm ViT's own ``patch_embed``, ``_pos_embed`` (class / register tokens and
    positional embeddings), ``blocks`` and final norm, so the trained encoder exports as a plain
    timm model. Every view is one masked image. Paper recipe: AdamW ``adam_betas=(0.9, 0.95)``,
    ``lr=1.5e-4`` per 256, ``weight_decay=0.05``, 40 warm-up epochs, mask ratio 0.75.

    Args:
        mask_ratio: fraction of patches hidden from the encoder.
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer.
        norm_pix_loss: reconstruct per-patch normalised pixels.
        **kwargs: :class:`~scratchpath.objectives.base.SSLObjective` arguments.
    """

    objective_name = "mae"

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        vit = self.backbone
        missing = [part for part in _VIT_PARTS if not hasattr(vit, part)]
        if missing:
            raise ScratchpathError(
                f"backbone: MAE needs a timm Vision Transformer, {self.hparams.backbone!r} "
                f"({type(vit).__name__}) lacks {', '.join(missing)}"
            )
        # Pooling layers are unused by MAE: freeze them so DDP sees no parameter without grad.
        for name in ("fc_norm", "attn_pool"):
            module = getattr(vit, name, None)
            if module is not None and module is not self.encoder_norm():
                module.requires_grad_(False)
        self.patch_size = vit.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(feature_dim(vit), decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        num_tokens = vit.num_prefix_tokens + vit.patch_embed.num_patches
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, decoder_dim))
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)

    def encoder_norm(self) -> nn.Module:
        """The encoder's final token norm: ``norm``, or ``fc_norm`` in global-pool ViTs."""
        vit = self.backbone
        if isinstance(vit.norm, nn.Identity):
            return getattr(vit, "fc_norm", vit.norm)
        return vit.norm

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def modules_to_compile(self) -> list[nn.Module]:
        return [*super().modules_to_compile(), *self.decoder_blocks]

    def encode(self, images: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, ...]:
        """Encoder on the visible patches: tokens ``(B, prefix + L_visible, D)``, mask, restore."""
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(images))  # (B, prefix + L, D), positions added
        prefix, patches = x[:, : vit.num_prefix_tokens], x[:, vit.num_prefix_tokens :]
        ids_keep, mask, ids_restore = random_masking(
            patches.shape[0], patches.shape[1], mask_ratio, patches.device
        )
        index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = vit.norm_pre(torch.cat([prefix, patches.gather(1, index)], dim=1))
        if getattr(vit, "grad_checkpointing", False):
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return self.encoder_norm()(x), mask, ids_restore

    def decode(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder: visible tokens + mask tokens in patch order → ``(B, L, p·p·3)`` pixels."""
        n_prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(tokens)  # (B, prefix + L_visible, E)
        prefix, visible = x[:, :n_prefix], x[:, n_prefix:]
        batch, num_patches = ids_restore.shape
        masked = self.mask_token.expand(batch, num_patches - visible.shape[1], -1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = torch.cat([visible, masked], dim=1).gather(1, index)  # (B, L, E)
        x = torch.cat([prefix, patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, n_prefix:])

    def compute_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        images = torch.cat(views) if len(views) > 1 else views[0]  # (B, 3, H, W)
        tokens, mask, ids_restore = self.encode(images, self.hparams.mask_ratio)
        pred = self.decode(tokens, ids_restore)
        target = patchify(images, self.patch_size)
        return mae_loss(pred, target, mask, self.hparams.norm_pix_loss)
