"""Tile codecs: how one (H, W, 3) uint8 tile becomes bytes in a shard, and back.

JPEG keeps full-resolution chroma by default (``jpeg:90:444``): in H&E the colour *is* the stain,
and chroma subsampling (4:2:0, the JPEG default and the codec of format-1 stores, recorded there
as plain ``jpeg:90``) caps the PSNR against the slide pixels at ~30 dB on CMU-1 whatever the
quality, while 4:4:4 at q90 gives ~40 dB for 1.5× the bytes (``benchmarks/bench_codecs.py``
measures both on the real slide). Lossless codecs barely compress H&E (zstd 1.05× at 9.8k/s,
PNG 1.33× at 1.0k/s, WebP-lossless 1.9× at 1.0k/s and 5 ms/tile to encode with method 0; 2.0×
but 100 ms/tile with method 6). Hence ``zstd`` (fast, standard zarr codecs only) and
``webp[:method]`` (smallest lossless) as the lossless choices.

Each codec is also a zarr v3 array->bytes codec, so ``zarr.open_group(store)["tiles"]`` decodes
tiles with zarr itself once :func:`register_zarr_codecs` has run (PatchStore and StoreWriter call
it). ``zstd`` needs no custom codec at all: it is zarr's standard ``bytes`` + ``zstd`` chain.

A damaged JPEG tile must fail the same way whichever decoder reads it (libjpeg-turbo through
imagecodecs on the CPU path, nvJPEG or libjpeg-turbo through TorchCodec on the device path), so
:func:`jpeg_damage` checks the stream itself before any decoder sees it: empty, not a JPEG,
truncated (no end-of-image marker; libjpeg-turbo would pad such a tile with grey and say
nothing), a broken header, a size other than the store's, or a byte pair in the entropy-coded
data that no JPEG stream holds there (``0xFF`` followed by anything but a stuffed zero, a
restart marker or a marker allowed between scans; libjpeg-turbo stops at it with "Unsupported
marker", nvJPEG is not known to). It costs ~2 % of a decode (``benchmarks/bench_codecs.py``:
19 µs per 29 KB tile against 889 µs, on a loaded 2-core machine), O(bytes) per tile. A flipped
bit that leaves a valid Huffman stream decodes to wrong pixels on every decoder and is caught by
none: the store keeps no per-tile checksum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration

from scratchpath.errors import ScratchpathError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_HELP = (
    "jpeg[:QUALITY[:444|422|420]] (lossy, default jpeg:90:444 = no chroma subsampling), "
    "zstd[:LEVEL] (lossless, fast), "
    "webp[:METHOD] (lossless, 2x smaller, METHOD 0-6 trades encode time for size)"
)
JPEG_SUBSAMPLINGS = ("444", "422", "420")
DEFAULT_SUBSAMPLING = "444"
# What a stored codec name without a subsampling field means: format-1 stores wrote "jpeg:90"
# with libjpeg's default 4:2:0.
LEGACY_SUBSAMPLING = "420"


class TileDataError(ValueError):
    """A tile's stored bytes are not a tile of this store; the message is the reason."""


# Markers that may follow 0xFF inside a JPEG's entropy-coded data (ITU T.81 B.1.1.2, B.2.4):
# a stuffed zero, restart markers RST0-7, fill bytes, and the segments that may sit between the
# scans of a progressive or multi-scan stream (DHT, DAC, SOS, DQT, DNL, DRI, APPn, COM).
_ENTROPY_OK = np.zeros(256, bool)
_ENTROPY_OK[[0x00, *range(0xD0, 0xD8), 0xFF, 0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE]] = True
_ENTROPY_OK[0xE0:0xF0] = True
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF})  # fmt: skip


def jpeg_damage(blob: bytes | memoryview | np.ndarray, tile_size: int | None = None) -> str | None:
    """Why ``blob`` cannot be a whole JPEG tile (of ``tile_size`` px when given), or None.

    Checks the stream's structure, not its pixels: see the module docstring for what it finds.
    """
    view = memoryview(blob).cast("B")  # indexing a memoryview gives ints cheaply
    n = len(view)
    if n == 0:
        return "empty (0 bytes)"
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return f"not a JPEG stream ({n} bytes without a start-of-image marker)"
    if view[n - 2] != 0xFF or view[n - 1] != 0xD9:
        return f"truncated JPEG ({n} bytes, no end-of-image marker)"
    pos, size = 2, None
    while True:  # the header segments, up to the first start of scan
        if pos + 4 > n - 2 or view[pos] != 0xFF:
            return f"JPEG header damaged (no marker at byte {pos})"
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2 or pos + 2 + length > n - 2:
            return f"JPEG header damaged (segment 0x{marker:02x} at byte {pos} runs past the end)"
        if marker in _SOF_MARKERS and length >= 8:
            size = ((view[pos + 5] << 8) | view[pos + 6], (view[pos + 7] << 8) | view[pos + 8])
        pos += 2 + length
        if marker == 0xDA:
            break
    if size is None:
        return "JPEG header damaged (no frame header before the scan)"
    if tile_size is not None and size != (tile_size, tile_size):
        return f"JPEG of {size[1]}x{size[0]} px in a store of {tile_size} px tiles"
    # The entropy-coded data (its last byte may be a fill byte before the end marker).
    entropy = np.frombuffer(view, np.uint8, count=n - 2 - pos, offset=pos)
    marks = np.flatnonzero(entropy[:-1] == 0xFF)
    bad = np.flatnonzero(~_ENTROPY_OK[entropy[marks + 1]])
    if len(bad):
        at = int(marks[bad[0]])
        marker = int(entropy[at + 1])
        return f"corrupt JPEG data (marker 0x{marker:02x} in the scan, byte {pos + at})"
    return None


@dataclass(frozen=True)
class TileCodec:
    """A picklable tile codec: ``encode(tile) -> bytes`` and ``decode(bytes) -> (H, W, 3)``.

    ``kind`` is ``"jpeg"``, ``"zstd"`` or ``"webp"``; ``level`` is the JPEG quality, the zstd
    level or the WebP (lossless) method; ``subsampling`` is the JPEG chroma subsampling
    (``"444"``: none, ``"422"``, ``"420"``; empty for the lossless codecs). ``tile_size`` is
    needed to reshape zstd's raw bytes.
    """

    kind: str
    level: int
    tile_size: int
    subsampling: str = ""

    @classmethod
    def parse(
        cls,
        spec: str,
        tile_size: int,
        quality: int = 90,
        default_subsampling: str = DEFAULT_SUBSAMPLING,
    ) -> TileCodec:
        """A codec from ``"jpeg"``, ``"jpeg:85"``, ``"jpeg:90:420"``, ``"zstd:9"`` or ``"webp"``.

        ``default_subsampling`` is used when a JPEG spec gives none: ``"444"`` for what a user
        asks for, :data:`LEGACY_SUBSAMPLING` when reading the codec name of a format-1 store.
        """
        kind, _, arg = spec.strip().lower().partition(":")
        arg, _, subsampling = arg.partition(":")
        defaults = {"jpeg": quality, "zstd": 3, "webp": 0}
        if kind not in defaults:
            raise ScratchpathError(f"codec: unknown codec {spec!r}; choose {CODEC_HELP}")
        try:
            level = int(arg) if arg else defaults[kind]
        except ValueError:
            raise ScratchpathError(f"codec: bad level in {spec!r}; choose {CODEC_HELP}") from None
        if kind == "jpeg":
            subsampling = subsampling or default_subsampling
            if subsampling not in JPEG_SUBSAMPLINGS:
                raise ScratchpathError(
                    f"codec: JPEG chroma subsampling must be one of {', '.join(JPEG_SUBSAMPLINGS)}"
                    f", got {subsampling!r} in {spec!r}"
                )
        elif subsampling:
            raise ScratchpathError(f"codec: only JPEG takes a subsampling field, got {spec!r}")
        if kind == "jpeg" and not 1 <= level <= 100:
            raise ScratchpathError(f"codec: JPEG quality must be 1..100, got {level}")
        if kind == "zstd" and not 1 <= level <= 22:
            raise ScratchpathError(f"codec: zstd level must be 1..22, got {level}")
        if kind == "webp" and not 0 <= level <= 6:
            raise ScratchpathError(f"codec: WebP method must be 0..6, got {level}")
        return cls(kind=kind, level=level, tile_size=int(tile_size), subsampling=subsampling)

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``"jpeg:90:444"``, ``"zstd:3"``, ``"webp:0"``."""
        if self.kind == "jpeg":
            return f"{self.kind}:{self.level}:{self.subsampling}"
        return f"{self.kind}:{self.level}"

    @property
    def lossless(self) -> bool:
        return self.kind != "jpeg"

    def encode(self, tile: np.ndarray) -> bytes:
        """Encode one (tile_size, tile_size, 3) uint8 RGB tile."""
        shape = (self.tile_size, self.tile_size, 3)
        if tile.shape != shape or tile.dtype != np.uint8:
            raise ValueError(f"tile must be {shape} uint8, got {tile.shape} {tile.dtype}")
        tile = np.ascontiguousarray(tile)
        if self.kind == "jpeg":
            return bytes(
                imagecodecs.jpeg8_encode(tile, level=self.level, subsampling=self.subsampling)
            )
        if self.kind == "zstd":
            return bytes(imagecodecs.zstd_encode(tile.tobytes(), level=self.level))
        return bytes(imagecodecs.webp_encode(tile, lossless=True, method=self.level))

    def decode(self, blob: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """Decode one tile, into ``out`` ((tile_size, tile_size, 3) uint8) when given.

        Raises :class:`TileDataError` (a JPEG that :func:`jpeg_damage` rejects) or the decoder's
        own error (``imagecodecs.*Error``, a ``RuntimeError``) for damaged bytes.
        """
        if self.kind == "jpeg":
            damage = jpeg_damage(blob, self.tile_size)
            if damage is not None:
                raise TileDataError(damage)
            return imagecodecs.jpeg8_decode(blob, out=out)
        if self.kind == "zstd":
            tile = np.frombuffer(imagecodecs.zstd_decode(blob), np.uint8)
            if tile.size != self.tile_size * self.tile_size * 3:
                raise TileDataError(f"zstd tile of {tile.size} bytes, not {self.tile_size} px RGB")
            tile = tile.reshape(self.tile_size, self.tile_size, 3)
        else:
            tile = imagecodecs.webp_decode(blob)
            if tile.shape != (self.tile_size, self.tile_size, 3):
                raise TileDataError(f"WebP tile of shape {tile.shape}, not {self.tile_size} px RGB")
        if out is None:
            return tile
        out[...] = tile
        return out

    def zarr_codecs(self) -> list[Any]:
        """The zarr v3 codec chain of one (1, H, W, 3) chunk."""
        from zarr.codecs import BytesCodec, ZstdCodec

        if self.kind == "zstd":
            return [BytesCodec(), ZstdCodec(level=self.level, checksum=False)]
        if self.kind == "jpeg":
            return [JpegZarrCodec(quality=self.level, subsampling=self.subsampling)]
        return [WebpZarrCodec(method=self.level)]


@dataclass(frozen=True)
class _ImageZarrCodec(ArrayBytesCodec):
    """A zarr v3 array->bytes codec for chunks of shape (1, H, W, 3) uint8 (one tile)."""

    codec_name: ClassVar[str]
    is_fixed_size = False

    def _tile_codec(self, tile_size: int) -> TileCodec:
        raise NotImplementedError

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        if np.dtype(dtype.to_native_dtype()) != np.uint8 or shape[-1] != 3:
            raise ValueError(f"{self.codec_name} needs a (..., H, W, 3) uint8 array")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        tile = self._tile_codec(chunk_spec.shape[-2]).decode(chunk_bytes.to_bytes())
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(tile.reshape(chunk_spec.shape))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        tile = np.asarray(chunk_array.as_ndarray_like()).reshape(chunk_spec.shape[-3:])
        blob = self._tile_codec(chunk_spec.shape[-2]).encode(tile)
        return chunk_spec.prototype.buffer.from_bytes(blob)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable-size output


@dataclass(frozen=True)
class JpegZarrCodec(_ImageZarrCodec):
    """JPEG (libjpeg-turbo via imagecodecs) as a zarr v3 codec named ``scratchpath.jpeg``."""

    codec_name: ClassVar[str] = "scratchpath.jpeg"
    quality: int = 90
    subsampling: str = LEGACY_SUBSAMPLING  # format-1 stores recorded no subsampling: 4:2:0

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, cls.codec_name, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        config = {"quality": self.quality, "subsampling": self.subsampling}
        return {"name": self.codec_name, "configuration": config}

    def _tile_codec(self, tile_size: int) -> TileCodec:
        return TileCodec("jpeg", self.quality, tile_size, self.subsampling)


@dataclass(frozen=True)
class WebpZarrCodec(_ImageZarrCodec):
    """Lossless WebP as a zarr v3 codec named ``scratchpath.webp``."""

    codec_name: ClassVar[str] = "scratchpath.webp"
    method: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, cls.codec_name, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": self.codec_name, "configuration": {"method": self.method}}

    def _tile_codec(self, tile_size: int) -> TileCodec:
        return TileCodec("webp", self.method, tile_size)


def register_zarr_codecs() -> None:
    """Make zarr-python able to decode scratchpath's JPEG and WebP tile chunks (idempotent)."""
    from zarr.registry import register_codec

    for codec_cls in (JpegZarrCodec, WebpZarrCodec):
        register_codec(codec_cls.codec_name, codec_cls)
