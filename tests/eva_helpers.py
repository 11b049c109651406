"""eva datasets of a few real tiles / slides for the model card's eva configs (imported by the
``eva`` process of tests/test_eva_configs.py, never by scratchpath)."""

from __future__ import annotations

from eva.vision.data.datasets import CRC, Camelyon16


class FewCRC(CRC):
    """eva's CRC dataset without its size check (the real one holds 100,000 + 7,180 tiles)."""

    def validate(self) -> None:
        pass


class FewCamelyon16(Camelyon16):
    """eva's Camelyon16 dataset without its file-count check (the real one holds 399 slides)."""

    def validate(self) -> None:
        pass
