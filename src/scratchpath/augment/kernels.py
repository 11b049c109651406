"""Batched torch kernels of the view augmentations: one per operation, at given parameters.

Each takes (B, 3, H, W) images in 0..255 (uint8 or float) with explicit per-sample parameters and
returns float32 0..255, unrounded, so that the device view path chains them without re-quantising
(the CPU path, which applies the same parameters with albumentations/OpenCV, rounds after each
op: the two differ by about one grey level per op, see ``tests/test_augment.py``). The random
parameters themselves are drawn by :mod:`scratchpath.views.params`, once for both paths.

None of them synchronises device and host: no ``.item()``, ``.nonzero()``, boolean indexing or
shape that depends on tensor values, and the constants they need are cached per device instead
of copied from host memory at every call.
"""

from __future__ import annotations

import numpy as np
import torch

from scratchpath.augment.transforms import D4_ELEMENTS, HED_FROM_RGB, RGB_FROM_HED
from scratchpath.errors import ScratchpathError

_DEVICE_CONSTANTS: dict[tuple[str, str], torch.Tensor] = {}


def _constant(name: str, value: np.ndarray, device: torch.device) -> torch.Tensor:
    """``value`` as float32 on ``device``, copied there once per process."""
    key = (name, str(device))
    tensor = _DEVICE_CONSTANTS.get(key)
    if tensor is None:
        tensor = torch.as_tensor(np.asarray(value, np.float32), device=device)
        _DEVICE_CONSTANTS[key] = tensor
    return tensor


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(-1, 1, 1, 1)


def resized_crops(
    tiles: torch.Tensor, boxes: torch.Tensor, elements: torch.Tensor, size: int
) -> torch.Tensor:
    """Bilinear ``size`` x ``size`` crops of ``tiles`` with a D4 element folded into each.

    ``tiles`` (B, C, H, W), ``boxes`` (V, B, 4) crop corners ``x0, y0, x1, y1`` in tile pixels
    (``A.RandomResizedCrop``'s ``crop_coords``), ``elements`` (V, B) in 0..7 numbered as
    :data:`~scratchpath.augment.transforms.D4_ELEMENTS` (bit 0: transpose, bit 1: mirror
    left-right, bit 2: mirror up-down). All V crops of every tile come from one ``grid_sample``
    (the V grids stacked along the output height), so no tile is copied V times. Output pixel
    ``i`` samples source ``x0 + (x1 - x0) (i + 0.5) / size - 0.5``: ``cv2.resize``'s
    INTER_LINEAR on the cut-out crop, except that a sample past the crop's edge reads the tile
    beyond it where OpenCV repeats the edge pixel (outermost row/column of upscaled crops only).
    Returns (V, B, C, size, size) float32.
    """
    v, b = boxes.shape[:2]
    height, width = tiles.shape[-2:]
    centres = (torch.arange(size, device=tiles.device, dtype=torch.float32) + 0.5) / size
    across = centres.view(1, 1, 1, size).expand(v, b, size, size)  # output column position
    down = centres.view(1, 1, size, 1).expand(v, b, size, size)  # output row position
    elements = elements.long().view(v, b, 1, 1)
    transpose = (elements & 1).bool()
    across, down = torch.where(transpose, down, across), torch.where(transpose, across, down)
    across = torch.where((elements & 2).bool(), 1 - across, across)
    down = torch.where((elements & 4).bool(), 1 - down, down)
    boxes = boxes.float()
    x0, y0 = boxes[..., 0, None, None] / width, boxes[..., 1, None, None] / height
    w = (boxes[..., 2, None, None] - boxes[..., 0, None, None]) / width
    h = (boxes[..., 3, None, None] - boxes[..., 1, None, None]) / height
    grid = torch.stack([x0 + w * across, y0 + h * down], dim=-1).mul_(2).sub_(1)
    grid = grid.permute(1, 0, 2, 3, 4).reshape(b, v * size, size, 2)  # views stacked in height
    out = torch.nn.functional.grid_sample(
        tiles.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, V * size, size)
    return out.view(b, -1, v, size, size).permute(2, 0, 1, 3, 4)


def _d4_table(side: int, device: torch.device) -> torch.Tensor:
    """(8, side²): the source pixel of every output pixel under each D4 element."""
    key = (f"d4:{side}", str(device))
    table = _DEVICE_CONSTANTS.get(key)
    if table is None:
        pos = torch.arange(side * side, device=device).view(side, side)
        rows = []
        for k in range(len(D4_ELEMENTS)):  # mirror first (bits 1, 2), then transpose (bit 0)
            t = pos.flip(-1) if k & 2 else pos
            t = t.flip(-2) if k & 4 else t
            rows.append((t.transpose(0, 1) if k & 1 else t).reshape(-1))
        table = _DEVICE_CONSTANTS[key] = torch.stack(rows)
    return table


def d4_torch(images: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """Per-sample D4 element (B,) (numbered as ``D4_ELEMENTS``) of square (B, C, S, S) images:
    one gather through a cached per-element pixel permutation, no host sync; keeps the dtype."""
    b, c, h, w = images.shape
    if h != w:
        raise ScratchpathError(f"d4: needs square images, got {h}x{w}")
    index = _d4_table(h, images.device)[elements.long()]  # (B, HW)
    flat = images.reshape(b, c, h * w)
    return flat.gather(2, index[:, None].expand(b, c, h * w)).view(b, c, h, w)


def hed_jitter_float(
    images: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    background_od: tuple[float, float] = (0.3, 0.6),
) -> torch.Tensor:
    """The fused HED map of :class:`~scratchpath.augment.HEDJitter` with per-sample ``alpha``,
    ``beta`` (B, 3) (the glass-sparing ramp included); ``alpha`` 1, ``beta`` 0 is the identity."""
    device = images.device
    rgb_from_hed = _constant("rgb_from_hed", RGB_FROM_HED, device)
    hed_from_rgb = _constant("hed_from_rgb", HED_FROM_RGB, device)
    matrix = hed_from_rgb @ (alpha.float()[:, :, None] * rgb_from_hed)  # (B, 3, 3)
    bias = beta.float() @ rgb_from_hed  # (B, 3)
    b, c, h, w = images.shape
    log_img = images.reshape(b, c, h * w).float().add(1.0).div_(256.0).log_()  # L = -OD
    # Change of L: (M - I)^T L - b per pixel, as one batched matmul (B, 3, 3) @ (B, 3, HW).
    change = (matrix - torch.eye(3, device=device)).transpose(1, 2)
    delta = torch.baddbmm(-bias[:, :, None], change, log_img)
    lo, hi = background_od
    weight = log_img.sum(1, keepdim=True).neg_().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
    out = delta.mul_(weight).add_(log_img).exp_().mul_(256.0).sub_(1.0)
    return out.clamp_(0, 255).reshape(b, c, h, w)


def brightness_contrast_float(
    images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """``clip(x * alpha + beta)`` per sample (``A.RandomBrightnessContrast`` with
    ``brightness_by_max=True``, ``beta`` in 0..255 units)."""
    return images.float().mul(_per_sample(alpha)).add_(_per_sample(beta)).clamp_(0, 255)


def gamma_float(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(x / 255) ** gamma * 255`` per sample (``A.RandomGamma``)."""
    # exp(gamma * log x) is pow with a per-sample exponent, 1.5x faster on CPU; log 0 = -inf
    # maps back to 0 as gamma > 0.
    out = (images.float() / 255.0).log_().mul_(_per_sample(gamma)).exp_()
    return out.mul_(255.0).clamp_(0, 255)


def gaussian_blur_float(
    images: torch.Tensor, sigma: torch.Tensor, max_sigma: float
) -> torch.Tensor:
    """Per-sample Gaussian blur like ``A.GaussianBlur(blur_limit=0)``: kernel size
    ``int(3.5 * sigma) * 2 + 1``, reflect-101 borders (OpenCV's default); ``sigma`` 0 (and
    sigma below 1/3.5) leaves a sample unchanged. The kernel array has the fixed size of
    ``max_sigma`` (the upper bound of the sigma range), so its shape never depends on the data;
    sigmas above ``max_sigma`` are truncated to that size."""
    radius_max = int(3.5 * max_sigma)
    if radius_max == 0:
        return images.float()
    sigma = sigma.float()
    radius = (sigma * 3.5).floor()  # (B,): A.GaussianBlur's kernel of size 2 * radius + 1
    x = torch.arange(-radius_max, radius_max + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x[None] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernel = kernel * (x[None].abs() <= radius[:, None])  # zero outside each sample's size
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K); sigma 0 -> the identity kernel
    b, c, h, w = images.shape
    pad = (radius_max,) * 4
    padded = torch.nn.functional.pad(images.float(), pad, mode="reflect").reshape(
        1, b * c, h + 2 * radius_max, w + 2 * radius_max
    )
    k = kernel[:, None].expand(b, c, kernel.shape[1]).reshape(b * c, -1)  # (B*C, K)
    rows = torch.nn.functional.conv2d(padded, k[:, None, :, None], groups=b * c)
    return torch.nn.functional.conv2d(rows, k[:, None, None, :], groups=b * c).view(b, c, h, w)


def to_gray_float(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (``A.ToGray``'s weighted average) replicated to 3 channels where
    ``apply`` (B,) is true."""
    images = images.float()
    r, g, b = images.unbind(1)
    gray = (0.299 * r + 0.587 * g + 0.114 * b)[:, None].expand_as(images)
    return torch.where(apply.bool().view(-1, 1, 1, 1), gray, images)


def solarize_float(
    images: torch.Tensor, apply: torch.Tensor, threshold: float = 127.5
) -> torch.Tensor:
    """``255 - x`` for pixels ``>= threshold`` where ``apply`` (B,) is true (``A.Solarize``'s
    threshold 0.5 of the range: uint8 values from 128 up)."""
    images = images.float()
    flipped = torch.where(images >= threshold, 255.0 - images, images)
    return torch.where(apply.bool().view(-1, 1, 1, 1), flipped, images)
