"""Pathology augmentations: albumentations transforms and their batched, sync-free torch twins.

Tissue has no "up" (so the 8 dihedral symmetries D4 are free augmentations) and stain colour
varies by lab and scanner while morphology does not (so stain jitter in optical-density space is
the colour augmentation of choice). Every numpy transform here is an albumentations transform
seeded through ``A.Compose(..., seed=)`` / ``set_random_state``; every torch twin takes explicit
per-sample parameters (``*_params`` draw them from a ``torch.Generator``) and works on uint8
``(B, 3, H, W)`` batches on any device, matching the numpy path in distribution, without a
single device-to-host synchronisation (so a GPU never waits for the CPU to look at a value).
The albumentations transforms stay the building blocks of users' own CPU pipelines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.type_definitions import d4_group_elements

from scratchpath.errors import ScratchpathError

__all__ = [
    "D4",
    "HE_MEAN",
    "HE_STD",
    "HEDJitter",
    "MacenkoNormalize",
    "brightness_contrast_float",
    "brightness_contrast_torch",
    "d4_torch",
    "gamma_float",
    "gamma_torch",
    "gaussian_blur_float",
    "gaussian_blur_torch",
    "hed_affine",
    "hed_jitter_float",
    "hed_jitter_torch",
    "hed_params",
    "micron_crop_scale",
    "random_resized_boxes",
    "resized_crops",
    "solarize_float",
    "solarize_torch",
    "to_gray_float",
    "to_gray_torch",
]

# Mean and std (RGB, 0..1) of every pixel of the real H&E tiles in /work/shared/data/tiles
# (deeptexture, NCT-CRC-HE, LC25000 lung, EBHI-Seg, Kather 2016: 1,465 tiles), each of the five
# collections weighted equally so that LC25000's blue cast does not dominate.
HE_MEAN: tuple[float, float, float] = (0.6400, 0.4688, 0.6765)
HE_STD: tuple[float, float, float] = (0.2344, 0.2772, 0.2307)

# Ruifrok & Johnston 2001 colour deconvolution (as in skimage.color): rows are the optical
# densities (R, G, B) of haematoxylin, eosin and the residual (DAB) channel.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Log intensity of each uint8 value: L = ln((I + 1) / 256) = -optical density. The +1 keeps
# black finite; exp(L) * 256 - 1 maps back exactly.
_LOG_LUT = np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0).astype(np.float32)

_CV2_D4 = {  # the group elements of A.D4, as OpenCV calls that return contiguous images
    "e": lambda x: x,
    "r90": lambda x: cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE),
    "r180": lambda x: cv2.rotate(x, cv2.ROTATE_180),
    "r270": lambda x: cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE),
    "v": lambda x: cv2.flip(x, 0),
    "hvt": lambda x: cv2.flip(cv2.transpose(x), -1),
    "h": lambda x: cv2.flip(x, 1),
    "t": cv2.transpose,
}


class D4(A.D4):
    """The 8 symmetries of the square (identity, rotations by 90/180/270°, 4 reflections):
    exact pixel permutations. Tissue has no "up", so all 8 are label-free augmentations.

    albumentations' ``A.D4`` (same group elements ``d4_group_elements``, same masks, boxes and
    keypoints) with images permuted by OpenCV: numpy's strided rot90/transpose views cost a
    slow copy later (``benchmarks/bench_augment.py``: about 10x faster on 224² RGB tiles).
    """

    def apply(self, img: np.ndarray, group_element: str, **params: Any) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] in (1, 3, 4) and img.dtype in (np.uint8, np.float32):
            out = _CV2_D4[group_element](np.ascontiguousarray(img))
            return out if out.ndim == 3 else out[..., None]  # OpenCV drops a single channel
        return super().apply(img, group_element=group_element, **params)


def hed_affine(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the HED jitter into one affine map of optical density: ``OD' = OD @ M + b``.

    ``alpha`` scales and ``beta`` shifts the (H, E, residual) concentrations (Tellez et al. 2019,
    "Quantifying the effects of data augmentation and stain color normalization in CNNs for
    computational pathology"); ``M = HED_FROM_RGB @ diag(alpha) @ RGB_FROM_HED``,
    ``b = beta @ RGB_FROM_HED``. Shapes (..., 3) -> (..., 3, 3), (..., 3).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    matrix = HED_FROM_RGB @ (alpha[..., :, None] * RGB_FROM_HED)
    return matrix, np.asarray(beta, dtype=np.float64) @ RGB_FROM_HED


class HEDJitter(A.ImageOnlyTransform):
    """Random haematoxylin / eosin / residual stain jitter (Tellez et al. 2019).

    Per image, each stain concentration ``c`` becomes ``alpha * c + beta`` with
    ``alpha ~ U(1 - strength, 1 + strength)`` and ``beta ~ U(-beta_strength, beta_strength)``
    (optical density in natural-log units, ``OD = -ln((I + 1) / 256)``). The whole perturbation
    is one fused 3x3 affine map in OD space. Background (glass: summed OD below
    ``background_od[0]``, ≈0.2 on real slides) is left untouched, tissue above
    ``background_od[1]`` gets the full jitter, with a linear ramp between, so glass never turns
    pink or blue. ``strength=0`` is the identity (within rounding).

    Args:
        strength: half-width of the concentration scale range (0.05 "HED-light", 0.2 "strong").
        beta_strength: half-width of the concentration shift range; defaults to ``strength``.
        background_od: summed-OD ramp (start, full) of the tissue weight.
        p: probability of applying the transform.
    """

    def __init__(
        self,
        strength: float = 0.05,
        beta_strength: float | None = None,
        background_od: tuple[float, float] = (0.3, 0.6),
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if strength < 0 or (beta_strength is not None and beta_strength < 0):
            raise ScratchpathError(f"HEDJitter.strength: must be >= 0, got {strength}")
        if not 0 <= background_od[0] < background_od[1]:
            raise ScratchpathError(
                f"HEDJitter.background_od: need 0 <= start < full, got {background_od}"
            )
        self.strength = float(strength)
        self.beta_strength = float(strength if beta_strength is None else beta_strength)
        self.background_od = (float(background_od[0]), float(background_od[1]))
        self._workspace: dict[tuple[int, ...], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_workspace": {}}  # buffers are per process

    def get_params(self) -> dict[str, Any]:
        alpha = self.random_generator.uniform(1 - self.strength, 1 + self.strength, size=3)
        beta = self.random_generator.uniform(-self.beta_strength, self.beta_strength, size=3)
        return {"alpha": alpha, "beta": beta}

    def apply(
        self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any
    ) -> np.ndarray:
        return hed_jitter_numpy(img, alpha, beta, self.background_od, self._workspace)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength", "beta_strength", "background_od")


def hed_jitter_numpy(
    img: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    background_od: tuple[float, float],
    workspace: dict[tuple[int, ...], np.ndarray] | None = None,
) -> np.ndarray:
    """Apply the fused HED map with fixed ``alpha``, ``beta`` (3,) to one (H, W, 3) uint8 image.

    ``workspace`` (any dict, kept by the caller) holds reusable float buffers: fresh 600 kB
    temporaries per call cost more in page faults than the arithmetic itself.
    """
    matrix, bias = hed_affine(alpha, beta)
    # Work in log intensity L = -OD, where the map reads L' = L @ M - b; cv2.transform computes
    # dst[c] = sum_k m[c, k] src[k] + m[c, 3], so m = [(M - I)^T | -b] gives the change of L.
    delta_map = np.hstack([(matrix - np.eye(3)).T, -bias[:, None]]).astype(np.float32)
    lo, hi = background_od
    ramp = np.full((3, 4), -1.0 / (hi - lo), dtype=np.float32)
    ramp[:, 3] = -lo / (hi - lo)  # weight = (sum OD - lo) / (hi - lo), in every channel
    shape = (*img.shape[:2], 3)
    buffers = None if workspace is None else workspace.get(shape)
    if buffers is None:
        buffers = np.empty((3, *shape), dtype=np.float32)
        if workspace is not None:
            workspace.clear()  # one tile size at a time
            workspace[shape] = buffers
    log_img, weight, delta = buffers
    cv2.LUT(np.ascontiguousarray(img), _LOG_LUT, dst=log_img)
    cv2.transform(log_img, ramp, dst=weight)
    np.clip(weight, 0.0, 1.0, out=weight)
    cv2.transform(log_img, delta_map, dst=delta)
    cv2.multiply(delta, weight, dst=delta)
    cv2.add(log_img, delta, dst=log_img)
    cv2.exp(log_img, dst=log_img)
    return cv2.addWeighted(log_img, 256.0, log_img, 0.0, -1.0, dtype=cv2.CV_8U)  # rounds


class MacenkoNormalize(A.ImageOnlyTransform):
    """Stain normalisation to a reference tile (Macenko et al. 2009, "A method for normalizing
    histology slides for quantitative analysis").

    The reference's two stain vectors and 99th-percentile concentrations are fitted once. For each
    image: optical densities of tissue pixels (every channel OD > ``od_threshold``) are projected
    on the plane of their two main eigenvectors, the 1st and 99th percentile angles give the H
    and E vectors, concentrations are solved by least squares, rescaled to the reference maxima
    and recomposed with the reference stain vectors. Images with too little tissue pass unchanged.

    Args:
        reference: an (H, W, 3) uint8 RGB tile or the path of an image file.
        od_threshold: per-channel OD below which a pixel counts as background.
        percentile: angle percentile (``100 - percentile`` and ``percentile``) for the extremes.
        p: probability of applying (1.0 for a preprocessing step).
    """

    def __init__(
        self,
        reference: np.ndarray | str | Path,
        od_threshold: float = 0.15,
        percentile: float = 99.0,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.od_threshold = float(od_threshold)
        self.percentile = float(percentile)
        from_file = isinstance(reference, str | Path)
        fitted = self._fit(_read_rgb(reference) if from_file else np.asarray(reference))
        if fitted is None:
            where = reference if from_file else "the reference array"
            raise ScratchpathError(f"MacenkoNormalize.reference: too little tissue in {where}")
        self.reference_stains, self.reference_max, _ = fitted

    def _fit(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Stain vectors (3, 2: H, E columns), 99th-percentile concentrations (2,) and the
        concentrations of every pixel (2, N); None when too little tissue."""
        od = -_LOG_LUT[img.reshape(-1, 3)].astype(np.float64)  # (N, 3)
        tissue = od[(od > self.od_threshold).all(axis=1)]
        if len(tissue) < max(50, od.shape[0] // 100):
            return None
        _, eigvecs = np.linalg.eigh(np.cov(tissue.T))
        plane = eigvecs[:, 1:]  # (3, 2), the two largest eigenvalues
        plane = plane * np.sign(plane.sum(axis=0, keepdims=True) + 1e-12)
        proj = tissue @ plane
        angle = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(angle, [100 - self.percentile, self.percentile])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        # Haematoxylin absorbs more red than eosin does.
        stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
        stains = np.abs(stains) / np.linalg.norm(stains, axis=0, keepdims=True)
        conc = np.linalg.pinv(stains) @ od.T  # (2, N) least squares; lstsq is 10x slower here
        return stains, np.maximum(np.percentile(conc, 99, axis=1), 1e-6), conc

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        fitted = self._fit(img)
        if fitted is None:
            return img
        _, max_conc, conc = fitted
        conc *= (self.reference_max / max_conc)[:, None]
        out = 256.0 * np.exp(-(self.reference_stains @ conc).T) - 1.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("od_threshold", "percentile")


def _read_rgb(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ScratchpathError(f"{path}: cannot read image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def micron_crop_scale(
    crop_microns: tuple[float, float], mpp: float, tile_px: int
) -> tuple[float, float]:
    """Area-fraction ``scale`` for ``A.RandomResizedCrop`` from a crop side range in µm.

    A square crop of side ``s`` µm covers ``(s / mpp / tile_px) ** 2`` of a ``tile_px`` tile
    stored at ``mpp`` µm/px; fractions are capped at 1.
    """
    if mpp is None or mpp <= 0:
        raise ScratchpathError("crop_microns: needs the store's µm/px (mpp), which is unknown")
    lo, hi = (min(1.0, (s / mpp / tile_px) ** 2) for s in crop_microns)
    if not 0 < lo <= hi:
        raise ScratchpathError(f"crop_microns: need 0 < min <= max, got {crop_microns}")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Batched torch twins. Public ones take uint8 (B, 3, H, W) and return uint8, with explicit
# per-sample parameters; the ``*_float`` ones work on float32 images in 0..255 (what the device
# view pipeline chains without re-quantising). None of them synchronises device and host: no
# ``.item()``, ``.nonzero()``, boolean indexing or shape that depends on tensor values, and the
# constants they need are cached per device instead of copied from host memory at every call.

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


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def hed_jitter_float(
    images: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    background_od: tuple[float, float] = (0.3, 0.6),
) -> torch.Tensor:
    """:func:`hed_jitter_torch` on float32 0..255 images; returns float32 (not rounded)."""
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


def hed_jitter_torch(
    images: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    background_od: tuple[float, float] = (0.3, 0.6),
) -> torch.Tensor:
    """The fused HED map of :class:`HEDJitter` with per-sample ``alpha``, ``beta`` (B, 3)."""
    return _quantise(hed_jitter_float(images, alpha, beta, background_od))


def hed_params(
    batch: int, strength: float, beta_strength: float, generator: torch.Generator, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (alpha, beta), each (B, 3), with :class:`HEDJitter`'s distributions."""
    u = torch.rand(2, batch, 3, generator=generator, device=device)
    return 1 + strength * (2 * u[0] - 1), beta_strength * (2 * u[1] - 1)


def _d4_one(x: torch.Tensor, name: str) -> torch.Tensor:
    # (..., H, W); numpy's rot90 on (H, W) rotates counter-clockwise in dims (H, W).
    transforms = {
        "e": lambda t: t,
        "r90": lambda t: torch.rot90(t, 1, (-2, -1)),
        "r180": lambda t: torch.rot90(t, 2, (-2, -1)),
        "r270": lambda t: torch.rot90(t, 3, (-2, -1)),
        "v": lambda t: t.flip(-2),
        "hvt": lambda t: torch.rot90(t, 2, (-2, -1)).transpose(-2, -1),
        "h": lambda t: t.flip(-1),
        "t": lambda t: t.transpose(-2, -1),
    }
    return transforms[name](x)


def d4_torch(images: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """Per-sample D4 symmetry of square images; ``elements`` (B,) index ``d4_group_elements``
    as ``A.D4`` does. One gather through a per-element pixel permutation: no host sync."""
    b, c, h, w = images.shape
    if h != w:
        raise ScratchpathError(f"d4: needs square images, got {h}x{w}")
    positions = torch.arange(h * w, device=images.device).view(h, w)
    table = torch.stack([_d4_one(positions, name).reshape(-1) for name in d4_group_elements])
    index = table[elements.long()]  # (B, HW): source pixel of every output pixel
    flat = images.reshape(b, c, h * w)
    return flat.gather(2, index[:, None].expand(b, c, h * w)).view(b, c, h, w)


def random_resized_boxes(
    n: int,
    scale: torch.Tensor | tuple[float, float],
    generator: torch.Generator,
    device: Any,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    aspect: float = 1.0,
    tries: int = 10,
) -> torch.Tensor:
    """``n`` crop boxes ``(x0, y0, width, height)`` as fractions of the tile side, drawn like
    ``A.RandomResizedCrop``: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), the
    first of ``tries`` draws that fits, else the whole tile; position uniform.

    ``scale`` is a pair or an (n, 2) tensor (per-sample ranges); ``aspect`` is the tile's
    width / height. The tries are drawn at once and the first fit chosen by ``argmax``, so the
    number of draws never depends on the data (no host sync; albumentations stops early).
    """
    u = torch.rand(4, tries, n, generator=generator, device=device)
    if isinstance(scale, torch.Tensor):  # (n, 2) per-sample ranges, already on the device
        low, high = scale[:, 0].float(), scale[:, 1].float()
    else:  # Python numbers: no host-to-device copy
        low, high = float(scale[0]), float(scale[1])
    area = low + (high - low) * u[0]  # (tries, n)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = log_lo + (log_hi - log_lo) * u[1]
    # Side fractions: width_px = sqrt(area * H * W * r) -> / W; height likewise -> / H.
    width = (area * log_ratio.exp() / aspect).sqrt()
    height = (area / log_ratio.exp() * aspect).sqrt()
    fits = (width <= 1) & (height <= 1)
    first = fits.to(torch.uint8).argmax(0)  # (n,) index of the first fitting try (0 if none)
    pick = first[None]
    width, height = width.gather(0, pick)[0], height.gather(0, pick)[0]
    x0 = (1 - width) * u[2].gather(0, pick)[0]
    y0 = (1 - height) * u[3].gather(0, pick)[0]
    fitted = fits.any(0)  # else the whole tile (square tiles: the central crop of A)
    x0, y0 = torch.where(fitted, x0, 0.0), torch.where(fitted, y0, 0.0)
    width, height = torch.where(fitted, width, 1.0), torch.where(fitted, height, 1.0)
    return torch.stack([x0, y0, width, height], dim=1)  # (n, 4)


def resized_crops(
    tiles: torch.Tensor, boxes: torch.Tensor, elements: torch.Tensor, size: int
) -> torch.Tensor:
    """Bilinear ``size`` x ``size`` crops of ``tiles`` with a D4 symmetry folded into each.

    ``tiles`` (B, C, H, W) float, ``boxes`` (V, B, 4) as from :func:`random_resized_boxes`,
    ``elements`` (V, B) in 0..7 (bit 0: transpose, bit 1: mirror left-right, bit 2: mirror
    up-down; the 8 combinations are the 8 elements of D4). All V crops of every tile come from
    one ``grid_sample`` (the V grids stacked along the output height), so no tile is copied V
    times. Sampling at output pixel centres with edge clamping is ``cv2.resize``'s INTER_LINEAR
    (what ``A.RandomResizedCrop`` uses). Returns (V, B, C, size, size).
    """
    v, b = boxes.shape[:2]
    centres = (torch.arange(size, device=tiles.device, dtype=torch.float32) + 0.5) / size
    across = centres.view(1, 1, 1, size).expand(v, b, size, size)  # output column position
    down = centres.view(1, 1, size, 1).expand(v, b, size, size)  # output row position
    elements = elements.view(v, b, 1, 1)
    transpose = (elements & 1).bool()
    across, down = torch.where(transpose, down, across), torch.where(transpose, across, down)
    across = torch.where((elements & 2).bool(), 1 - across, across)
    down = torch.where((elements & 4).bool(), 1 - down, down)
    x0, y0, width, height = (boxes[..., i, None, None] for i in range(4))
    grid = torch.stack([x0 + width * across, y0 + height * down], dim=-1).mul_(2).sub_(1)
    grid = grid.permute(1, 0, 2, 3, 4).reshape(b, v * size, size, 2)  # views stacked in height
    out = torch.nn.functional.grid_sample(
        tiles, grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, V * size, size)
    return out.view(b, -1, v, size, size).permute(2, 0, 1, 3, 4)


def gaussian_blur_float(
    images: torch.Tensor, sigma: torch.Tensor, max_sigma: float
) -> torch.Tensor:
    """:func:`gaussian_blur_torch` on float images, returns float (not rounded)."""
    radius_max = int(3.5 * max_sigma)
    if radius_max == 0:
        return images
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
    k = kernel.repeat_interleave(c, 0)  # (B*C, K)
    rows = torch.nn.functional.conv2d(padded, k[:, None, :, None], groups=b * c)
    return torch.nn.functional.conv2d(rows, k[:, None, None, :], groups=b * c).view(b, c, h, w)


def gaussian_blur_torch(
    images: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0
) -> torch.Tensor:
    """Per-sample Gaussian blur like ``A.GaussianBlur(blur_limit=0)``: kernel size
    ``int(3.5 * sigma) * 2 + 1``, reflect-101 borders (OpenCV's default); ``sigma <= 0`` (and
    sigma below 1/3.5) leaves a sample unchanged. The kernel array has the fixed size of
    ``max_sigma`` (the upper bound of the sigma range), so its shape never depends on the data;
    sigmas above ``max_sigma`` are truncated to that size."""
    return _quantise(gaussian_blur_float(images, sigma, max_sigma))


def brightness_contrast_float(
    images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """``clip(x * alpha + beta)`` per sample on float images."""
    return images.float().mul(_per_sample(alpha)).add_(_per_sample(beta)).clamp_(0, 255)


def brightness_contrast_torch(
    images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """``clip(x * alpha + beta)`` per sample, as ``A.RandomBrightnessContrast`` with
    ``brightness_by_max=True`` (``beta`` already in 0..255 units). Truncates like its LUT."""
    return brightness_contrast_float(images, alpha, beta).to(torch.uint8)


def gamma_float(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(x / 255) ** gamma * 255`` per sample on float images."""
    # exp(gamma * log x) is pow with a per-sample exponent, 1.5x faster on CPU; log 0 = -inf
    # maps back to 0 as gamma > 0.
    out = (images.float() / 255.0).log_().mul_(_per_sample(gamma)).exp_()
    return out.mul_(255.0).clamp_(0, 255)


def gamma_torch(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(x / 255) ** gamma * 255`` per sample, truncated, as ``A.RandomGamma``'s uint8 LUT."""
    return gamma_float(images, gamma).to(torch.uint8)


def to_gray_float(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma replicated to 3 channels where ``apply`` (B,) bool, on float images."""
    r, g, b = images.float().unbind(1)
    gray = (0.299 * r + 0.587 * g + 0.114 * b)[:, None].expand_as(images)
    return torch.where(apply.view(-1, 1, 1, 1), gray, images)


def to_gray_torch(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (``A.ToGray`` weighted average) replicated to 3 channels where ``apply``."""
    gray = _quantise(to_gray_float(images.float(), torch.ones_like(apply)))
    return torch.where(apply.view(-1, 1, 1, 1), gray, images)


def solarize_float(
    images: torch.Tensor, apply: torch.Tensor, threshold: float = 127.5
) -> torch.Tensor:
    """``255 - x`` for pixels ``>= threshold`` where ``apply`` (B,) bool (``A.Solarize``'s
    default threshold 0.5 of the range: uint8 values from 128 up)."""
    flipped = torch.where(images >= threshold, 255.0 - images, images)
    return torch.where(apply.view(-1, 1, 1, 1), flipped, images)


def solarize_torch(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``A.Solarize`` (default threshold) on uint8 images where ``apply`` (B,) bool."""
    return solarize_float(images.float(), apply).to(torch.uint8)
