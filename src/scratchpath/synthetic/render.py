"""Procedural H&E tissue: stain model, morphology fields and region rendering.

See the package docstring (:mod:`scratchpath.synthetic`) for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

TISSUE_TYPES: tuple[str, ...] = ("tumour", "stroma", "glandular", "adipose")
_TUMOUR, _STROMA, _GLAND, _ADIPOSE = range(4)

# Macenko et al. (2009) reference H&E optical-density vectors (RGB), unit length.
_H_REFERENCE = np.array([0.5626, 0.7201, 0.4062])
_E_REFERENCE = np.array([0.2159, 0.8012, 0.5581])

_FIELD_STEP_UM = 32.0  # resolution of the low-frequency fields (outline, tissue type, stain)
_BLUR_MARGIN = 8  # px rendered around a region so that blurs join without seams


# ----------------------------------------------------------------------------- hashing / noise
def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) value per integer lattice point: stateless, so regions agree at seams."""
    ix, iy = np.broadcast_arrays(np.asarray(ix, np.int64), np.asarray(iy, np.int64))
    with np.errstate(over="ignore"):
        h = ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.uint64((seed * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(33)  # splitmix / murmur finaliser
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _value_noise(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] at lattice coordinates (u, v) (one lattice cell = 1.0)."""
    u0, v0 = math.floor(float(u.min())), math.floor(float(v.min()))
    nu, nv = math.floor(float(u.max())) - u0 + 2, math.floor(float(v.max())) - v0 + 2
    lattice = _hash01(np.arange(u0, u0 + nu)[None, :], np.arange(v0, v0 + nv)[:, None], seed)
    # Relative to the lattice window (float32 keeps sub-pixel precision there), smoothstepped so
    # the lattice does not show as a diamond pattern.
    fu, fv = (u - u0).astype(np.float32), (v - v0).astype(np.float32)
    iu, iv = np.floor(fu), np.floor(fv)
    tu, tv = fu - iu, fv - iv
    fu = iu + tu * tu * (3 - 2 * tu)
    fv = iv + tv * tv * (3 - 2 * tv)
    return cv2.remap(lattice.astype(np.float32), fu, fv, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)  # fmt: skip


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency Gaussian random field, standardised to mean 0 / std 1."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


# ----------------------------------------------------------------------------- stain
@dataclass(frozen=True)
class StainProfile:
    """One slide's staining and scanning: stain vectors, intensities, glass colour."""

    h_vector: np.ndarray  # (3,) unit OD vector of haematoxylin
    e_vector: np.ndarray  # (3,) unit OD vector of eosin
    h_scale: float
    e_scale: float
    background: np.ndarray  # (3,) RGB intensity of empty glass (I0)

    @classmethod
    def random(cls, rng: np.random.Generator) -> StainProfile:
        """Lab-to-lab variation: vector angles ±~5°, intensities ±30 %, glass tint."""

        def jitter(vector: np.ndarray) -> np.ndarray:
            v = np.clip(vector + rng.normal(0, 0.06, 3), 0.05, None)
            return v / np.linalg.norm(v)

        return cls(
            h_vector=jitter(_H_REFERENCE),
            e_vector=jitter(_E_REFERENCE),
            h_scale=float(rng.uniform(0.7, 1.3)),
            e_scale=float(rng.uniform(0.65, 1.35)),
            background=np.clip(rng.normal(239, 3, 3), 228, 250),
        )

    def to_rgb(self, h: np.ndarray, e: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Concentrations (H, W) -> RGB uint8 by Beer–Lambert."""
        # OD = -[h·H + e·E] per channel, one 3×2 matrix product per pixel (cv2: SIMD, no temps).
        stains = -np.stack([self.h_vector * self.h_scale, self.e_vector * self.e_scale], axis=1)
        od = cv2.transform(cv2.merge([h, e]), stains.astype(np.float32))
        rgb = cv2.exp(od)
        rgb *= self.background.astype(np.float32)
        rgb += noise[..., None]
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the slide
class SyntheticSlide:
    """A procedural H&E slide; :meth:`render` returns any level-0 region as RGB uint8.

    Args:
        width, height: level-0 size in pixels.
        mpp: µm per pixel (sizes of nuclei, glands, fat cells are physical).
        tissue: ``"mixed"`` (regions of all types) or one of ``TISSUE_TYPES``.
        seed: everything (outline, regions, cells, stain) follows from it.
        outline: False fills the whole image with tissue (used for labelled tiles).
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        mpp: float = 0.5,
        tissue: str = "mixed",
        seed: int = 0,
        outline: bool = True,
    ) -> None:
        if tissue != "mixed" and tissue not in TISSUE_TYPES:
            raise ValueError(f"tissue: {tissue!r} is not 'mixed' or one of {TISSUE_TYPES}")
        if width < 1 or height < 1 or mpp <= 0:
            raise ValueError(f"size/mpp: need positive values, got {width}x{height} @ {mpp}")
        self.width, self.height, self.mpp, self.tissue = width, height, mpp, tissue
        self.seed = seed
        rng = np.random.default_rng([seed, 0x5EED])
        self.stain = StainProfile.random(rng)
        self.px_per_um = 1.0 / mpp
        self.step = max(4.0, _FIELD_STEP_UM * self.px_per_um)  # px per low-res field cell
        gh, gw = math.ceil(height / self.step) + 1, math.ceil(width / self.step) + 1
        self._outline = self._make_outline((gh, gw), rng) if outline else None
        self._types = self._make_type_fields((gh, gw), rng)
        self._fibre_dirs = np.stack([_smooth_field((gh, gw), 4, rng) for _ in range(3)])
        self._fibre_angles = rng.uniform(0, np.pi) + np.arange(3) * np.pi / 3
        self._intensity = 1.0 + 0.1 * _smooth_field((gh, gw), 12, rng)

    # -- low-resolution fields -------------------------------------------------------------
    def _make_outline(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Signed distance-like field in field cells (> 0 inside tissue): 1–3 blobby pieces.

        The large-scale wobble grows with the slide, the fine raggedness of the edge does not
        (about one cell, ~30 µm), so big and small slides both get a crisp, irregular border.
        """
        gh, gw = shape
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
        field = np.full(shape, -1.0, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.3, 0.7) * gw, rng.uniform(0.3, 0.7) * gh
            rx, ry = rng.uniform(0.25, 0.42) * gw, rng.uniform(0.25, 0.42) * gh
            a = rng.uniform(0, np.pi)
            dx, dy = xx - cx, yy - cy
            u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
            field = np.maximum(field, 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2))
        radius = 0.33 * min(gh, gw)  # cells from the centre of a piece to its edge
        coarse = _smooth_field(shape, max(2.0, min(gh, gw) / 8), rng)
        return radius * (field + 0.18 * coarse) + 0.5 * _smooth_field(shape, 1.5, rng)

    def _make_type_fields(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """(4, gh, gw) logits of the tissue types; softmax gives smooth region borders."""
        if self.tissue != "mixed":
            logits = np.full((4, *shape), -20.0, np.float32)
            logits[TISSUE_TYPES.index(self.tissue)] = 20.0
            return logits
        return np.stack([6.0 * _smooth_field(shape, 10, rng) for _ in TISSUE_TYPES])

    def _sample(self, field: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Bilinear lookup of a low-res field at level-0 pixel coordinates (any shape)."""
        coords = [(np.ravel(ys) + 0.5) / self.step, (np.ravel(xs) + 0.5) / self.step]
        out = ndimage.map_coordinates(field, coords, order=1, mode="nearest")
        return out.reshape(np.shape(xs))

    def _grid(self, field: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        mx = np.broadcast_to(((np.arange(x0, x0 + w) + 0.5) / self.step).astype(np.float32), (h, w))
        col = ((np.arange(y0, y0 + h) + 0.5) / self.step).astype(np.float32)[:, None]
        my = np.broadcast_to(col, (h, w))
        return cv2.remap(
            field, np.ascontiguousarray(mx), np.ascontiguousarray(my), cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip

    def type_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Index into ``TISSUE_TYPES`` of the dominant tissue at level-0 points."""
        logits = np.stack([self._sample(f, xs, ys) for f in self._types])
        return logits.argmax(0)

    def in_tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """True at level-0 points inside the tissue outline (the ground truth of a mask)."""
        if self._outline is None:
            return np.ones(np.shape(xs), bool)
        return self._sample(self._outline, xs, ys) > 0

    # -- rendering -------------------------------------------------------------------------
    def render(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The level-0 region at (x, y) of the given size as (height, width, 3) uint8 RGB."""
        m = _BLUR_MARGIN
        x0, y0, w, h = x - m, y - m, width + 2 * m, height + 2 * m
        if self._outline is not None:
            inside = self._grid(self._outline, x0, y0, w, h)
            if inside.max() < -0.5:  # only glass (see the edge below): skip the tissue work
                return self._glass(x, y, width, height)
        types = np.stack([self._grid(f, x0, y0, w, h) for f in self._types])  # (4, h, w)
        types = np.exp(types - types.max(0, keepdims=True))
        types /= types.sum(0, keepdims=True)
        hema = np.zeros((h, w), np.float32)  # haematoxylin concentration
        eosin = np.zeros((h, w), np.float32)
        fibres = self._fibres(x0, y0, w, h)
        # Extracellular matrix: collagen texture, strongest in stroma.
        eosin += types[_STROMA] * (0.25 + 0.9 * fibres)
        eosin += types[_GLAND] * (0.2 + 0.7 * fibres)
        eosin += types[_TUMOUR] * (0.32 + 0.15 * fibres)  # cytoplasm of tumour cells
        hema += 0.05 + types[_TUMOUR] * 0.12
        if types[_ADIPOSE].max() > 0.01:
            membranes = self._adipocyte_membranes(x0, y0, w, h)
            eosin += types[_ADIPOSE] * (0.02 + 0.55 * membranes)
            hema *= 1.0 - types[_ADIPOSE] * (1.0 - membranes)
        nuclei = np.zeros((h, w), np.float32)
        if types[_GLAND].max() > 0.01:
            self._draw_glands(hema, eosin, nuclei, x0, y0, w, h)
        self._draw_nuclei(nuclei, x0, y0, w, h)
        nuclei = cv2.GaussianBlur(nuclei, (0, 0), 0.6 * self.px_per_um)
        chromatin = _value_noise(*self._coords(x0, y0, w, h, 1.2), self.seed + 11)
        hema += nuclei * (0.55 + 0.7 * chromatin)
        eosin *= 1.0 - 0.7 * np.clip(nuclei, 0, 1)
        scale = self._grid(self._intensity, x0, y0, w, h)
        if self._outline is not None:
            # Ragged edge: ±0.2 cells of 12 µm noise, then a ~10 µm soft transition.
            edge = _value_noise(*self._coords(x0, y0, w, h, 12.0), self.seed + 5) - 0.5
            mask = np.clip((inside + 0.4 * edge) * 3.0 + 0.5, 0, 1)
            scale = scale * mask
        noise = self._sensor_noise(x0, y0, w, h)
        rgb = self.stain.to_rgb(hema * scale, eosin * scale, noise)
        return np.ascontiguousarray(rgb[m : m + height, m : m + width])

    def _coords(self, x0: int, y0: int, w: int, h: int, um: float) -> tuple[np.ndarray, ...]:
        """Lattice coordinates of a region for noise with a feature size of ``um`` µm."""
        k = 1.0 / (um * self.px_per_um)
        u = np.broadcast_to(np.arange(x0, x0 + w, dtype=np.float64) * k, (h, w))
        v = np.broadcast_to((np.arange(y0, y0 + h, dtype=np.float64) * k)[:, None], (h, w))
        return u, v

    def _glass(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        noise = self._sensor_noise(x, y, w, h)
        zero = np.zeros((h, w), np.float32)
        return self.stain.to_rgb(zero, zero, noise)

    def _sensor_noise(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        return ((_hash01(xs, ys, self.seed + 3) - 0.5) * 4.0).astype(np.float32)

    def _fibres(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Collagen: ridged anisotropic noise along 3 directions blended by a smooth field."""
        xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]
        ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]
        length, thickness = 25.0 * self.px_per_um, 2.2 * self.px_per_um
        weights = np.stack([self._grid(f, x0, y0, w, h) for f in self._fibre_dirs]) * 3.0
        weights = np.exp(weights - weights.max(0, keepdims=True))
        weights /= weights.sum(0, keepdims=True)
        out = np.zeros((h, w), np.float32)
        for k, angle in enumerate(self._fibre_angles):
            c, s = math.cos(angle), math.sin(angle)
            u, v = (xs * c + ys * s) / length, (-xs * s + ys * c) / thickness
            n = _value_noise(u, v, self.seed + 100 + k)
            out += weights[k] * (1.0 - np.abs(2.0 * n - 1.0)) ** 3  # ridges: thin bright lines
        return out

    def _adipocyte_membranes(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Thin walls between fat cells: Worley noise F2 − F1 below a few µm.

        F2 − F1 is piecewise smooth, so it is computed on a coarse grid aligned to the slide
        (every ``step`` px) and interpolated: 1/16 of the work, same walls.
        """
        cell, step = 45.0 * self.px_per_um, 4
        gx0, gy0 = x0 // step, y0 // step
        nw, nh = (x0 + w) // step - gx0 + 2, (y0 + h) // step - gy0 + 2
        xs = (np.arange(gx0, gx0 + nw, dtype=np.float32) * step)[None, :] / cell
        ys = (np.arange(gy0, gy0 + nh, dtype=np.float32) * step)[:, None] / cell
        ix0, iy0 = math.floor(float(xs.min())), math.floor(float(ys.min()))
        ix1, iy1 = math.floor(float(xs.max())), math.floor(float(ys.max()))
        gx, gy = np.meshgrid(np.arange(ix0 - 1, ix1 + 2), np.arange(iy0 - 1, iy1 + 2))
        px = (gx + 0.15 + 0.7 * _hash01(gx, gy, self.seed + 21)).astype(np.float32)
        py = (gy + 0.15 + 0.7 * _hash01(gx, gy, self.seed + 22)).astype(np.float32)
        cx, cy = np.floor(xs).astype(int) - (ix0 - 1), np.floor(ys).astype(int) - (iy0 - 1)
        f1 = np.full((nh, nw), np.inf, np.float32)
        f2 = np.full((nh, nw), np.inf, np.float32)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                j, i = np.broadcast_arrays(cy + dy, cx + dx)
                d = np.sqrt((xs - px[j, i]) ** 2 + (ys - py[j, i]) ** 2)
                f2 = np.minimum(f2, np.maximum(f1, d))
                f1 = np.minimum(f1, d)
        wall_um = (f2 - f1) * (cell / self.px_per_um)
        mx = np.broadcast_to(((np.arange(x0, x0 + w) / step) - gx0).astype(np.float32), (h, w))
        my = np.broadcast_to(
            ((np.arange(y0, y0 + h) / step) - gy0).astype(np.float32)[:, None], (h, w)
        )
        wall_um = cv2.remap(
            wall_um, np.ascontiguousarray(mx), np.ascontiguousarray(my), cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        return np.clip(1.0 - wall_um / 2.5, 0, 1)

    def _cells(self, x0: int, y0: int, w: int, h: int, size: float, reach: float):
        """Integer ids of the object cells of ``size`` px whose objects may reach the region."""
        gx0, gy0 = math.floor((x0 - reach) / size), math.floor((y0 - reach) / size)
        gx1, gy1 = math.floor((x0 + w + reach) / size), math.floor((y0 + h + reach) / size)
        gx, gy = np.meshgrid(np.arange(gx0, gx1 + 1), np.arange(gy0, gy1 + 1))
        return gx.ravel(), gy.ravel()

    def _draw_glands(self, hema, eosin, nuclei, x0: int, y0: int, w: int, h: int) -> None:
        s = self.px_per_um
        cell = 120.0 * s
        gx, gy = self._cells(x0, y0, w, h, cell, cell)
        rnd = [_hash01(gx, gy, self.seed + 40 + k) for k in range(7)]
        cx, cy = (gx + 0.3 + 0.4 * rnd[0]) * cell, (gy + 0.3 + 0.4 * rnd[1]) * cell
        keep = (self.type_at(cx, cy) == _GLAND) & (rnd[2] < 0.9)
        epithelium = np.zeros((h, w), np.float32)
        lumen = np.zeros((h, w), np.float32)
        for k in np.flatnonzero(keep):
            rx = (10 + 12 * rnd[3][k]) * s
            ry = rx * (0.6 + 0.4 * rnd[4][k])
            angle = 180.0 * rnd[5][k]
            thick = (8 + 5 * rnd[6][k]) * s
            centre = (cx[k] - x0, cy[k] - y0)
            _ellipses(
                epithelium, [centre[0]], [centre[1]], [rx + thick], [ry + thick], [angle], [1]
            )
            _ellipses(lumen, [centre[0]], [centre[1]], [rx], [ry], [angle], [1])
            self._draw_gland_nuclei(nuclei, centre, rx + 0.55 * thick, ry + 0.55 * thick, angle,
                                    int(gx[k]), int(gy[k]))  # fmt: skip
        eosin[:] = eosin * (1 - epithelium) + 0.42 * epithelium  # columnar cell cytoplasm
        eosin[:] = eosin * (1 - lumen) + 0.05 * lumen  # pale secretion in the lumen
        hema *= 1 - 0.8 * lumen

    def _draw_gland_nuclei(self, nuclei, centre, rx, ry, angle_deg, gx: int, gy: int) -> None:
        """Columnar epithelial nuclei on a ring, long axis pointing at the lumen."""
        s = self.px_per_um
        n = max(8, int(2 * math.pi * math.sqrt((rx * rx + ry * ry) / 2) / (5.0 * s)))
        phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
        a = math.radians(angle_deg)
        ex, ey = rx * np.cos(phi), ry * np.sin(phi)
        px = centre[0] + ex * math.cos(a) - ey * math.sin(a)
        py = centre[1] + ex * math.sin(a) + ey * math.cos(a)
        radial = np.degrees(np.arctan2(py - centre[1], px - centre[0]))
        jitter = _hash01(np.full(n, gx), np.arange(n) + 1000 * gy, self.seed + 47)
        _ellipses(nuclei, px, py, (3.6 + 1.2 * jitter) * s, (1.7 + 0.5 * jitter) * s, radial,
                  0.9 + 0.4 * jitter)  # fmt: skip

    def _draw_nuclei(self, nuclei, x0: int, y0: int, w: int, h: int) -> None:
        """Cell nuclei scattered per tissue type (crowded in tumour, sparse spindles in stroma)."""
        s = self.px_per_um
        cell = 9.0 * s
        gx, gy = self._cells(x0, y0, w, h, cell, 8 * s)
        r = [_hash01(gx, gy, self.seed + 60 + k) for k in range(7)]
        cx, cy = (gx + r[0]) * cell, (gy + r[1]) * cell
        kind = self.type_at(cx, cy)
        # Probability that a 9 µm cell holds a nucleus, by tissue type.
        keep = r[2] < np.array([0.9, 0.09, 0.05, 0.015])[kind]
        lymph = r[6] < np.array([0.08, 0.15, 0.3, 0.1])[kind]
        tumour = kind == _TUMOUR
        # Default: fibroblast / flattened adipocyte nucleus, elongated along the fibres.
        a = (4.5 + 2.5 * r[3]) * s
        b = (1.1 + 0.5 * r[4]) * s
        angle = np.degrees(self._dominant_fibre_angle(cx, cy)) + 30 * (r[5] - 0.5)
        value = np.full(len(cx), 1.2)
        # Tumour: large, pleomorphic, hyperchromatic, any orientation.
        a = np.where(tumour, (3.8 + 2.6 * r[3]) * s, a)
        b = np.where(tumour, a * (0.6 + 0.4 * r[4]), b)
        angle = np.where(tumour, 360 * r[5], angle)
        value = np.where(tumour, 1.0 + 0.6 * r[4], value)
        # Lymphocytes: small, round, dark.
        a = np.where(lymph, (2.4 + 0.6 * r[3]) * s, a)
        b = np.where(lymph, a, b)
        value = np.where(lymph, 1.6, value)
        k = keep
        _ellipses(nuclei, cx[k] - x0, cy[k] - y0, a[k], b[k], angle[k], value[k])

    def _dominant_fibre_angle(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        weights = np.stack([self._sample(f, xs, ys) for f in self._fibre_dirs])
        return self._fibre_angles[weights.argmax(0)]


def _ellipses(img: np.ndarray, xs, ys, a, b, angle_deg, value) -> None:
    """Filled ellipses (semi-axes a, b px) with 1/16-px precision; cv2 clips to the canvas."""
    xs, ys = np.round(np.asarray(xs) * 16).astype(int), np.round(np.asarray(ys) * 16).astype(int)
    a = np.maximum(1, np.round(np.asarray(a) * 16)).astype(int)
    b = np.maximum(1, np.round(np.asarray(b) * 16)).astype(int)
    angle_deg = np.broadcast_to(np.asarray(angle_deg, float), xs.shape).tolist()
    value = np.broadcast_to(np.asarray(value, float), xs.shape).tolist()
    rows = zip(xs.tolist(), ys.tolist(), a.tolist(), b.tolist(), angle_deg, value, strict=True)
    for x, y, ax, bx, ang, val in rows:
        cv2.ellipse(img, (x, y), (ax, bx), ang, 0, 360, val, -1, cv2.LINE_8, 4)


# ----------------------------------------------------------------------------- writing slides
