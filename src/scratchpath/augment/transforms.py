"""Pathology transforms in albumentations' form: the building blocks of CPU pipelines.

Tissue has no "up" (so the 8 dihedral symmetries D4 are free augmentations) and stain colour
varies by lab and scanner while morphology does not (so stain jitter in optical-density space is
the colour augmentation of choice). Every transform here is an albumentations transform seeded
through ``A.Compose(..., seed=)`` / ``set_random_state``, usable in users' own pipelines; the
view generators (:mod:`scratchpath.views`) call the same operations at parameters they draw
themselves (:mod:`scratchpath.views.params`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np

from scratchpath.errors import ScratchpathError

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

# The D4 elements numbered as the view paths number them: bit 0 transposes, bit 1 mirrors
# left-right, bit 2 mirrors up-down (the image is mirrored first, then transposed), so that the
# device path folds element k into its sampling grid with three bit tests. D4_ELEMENTS[k] is the
# name A.D4 gives element k.
D4_ELEMENTS: tuple[str, ...] = ("e", "t", "h", "r90", "v", "r270", "r180", "hvt")


def d4_numpy(img: np.ndarray, element: int) -> np.ndarray:
    """D4 element ``element`` (numbered as :data:`D4_ELEMENTS`) of an (H, W, C) uint8 or
    float32 image with 1, 3 or 4 channels, permuted by OpenCV (what :class:`D4` applies)."""
    return _cv2_d4(img, D4_ELEMENTS[element])


def _cv2_d4(img: np.ndarray, name: str) -> np.ndarray:
    out = _CV2_D4[name](np.ascontiguousarray(img))
    return out if out.ndim == 3 else out[..., None]  # OpenCV drops a single channel


class D4(A.D4):
    """The 8 symmetries of the square (identity, rotations by 90/180/270°, 4 reflections):
    exact pixel permutations. Tissue has no "up", so all 8 are label-free augmentations.

    albumentations' ``A.D4`` (same group elements ``d4_group_elements``, same masks, boxes and
    keypoints) with images permuted by OpenCV: numpy's strided rot90/transpose views cost a
    slow copy later (``benchmarks/bench_augment.py``: about 10x faster on 224² RGB tiles).
    """

    def apply(self, img: np.ndarray, group_element: str, **params: Any) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] in (1, 3, 4) and img.dtype in (np.uint8, np.float32):
            return _cv2_d4(img, group_element)
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
