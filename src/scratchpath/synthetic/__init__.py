"""Procedural H&E whole-slide images: realistic enough to exercise the whole pipeline.

A :class:`SyntheticSlide` is a pure function of level-0 pixel coordinates: any region can be
rendered on its own and neighbouring regions join without seams, so a 50k×50k slide is written
tile row by tile row (:func:`write_slide`) and never held in memory.

Rendering follows how brightfield H&E forms colour (Ruifrok & Johnston, *Anal. Quant. Cytol.
Histol.* 2001): per pixel a haematoxylin and an eosin *concentration* are built from tissue
morphology, mapped to optical density with the slide's stain vectors (Macenko et al., ISBI 2009
reference vectors, jittered per slide), then to RGB by Beer–Lambert (``I = I0·exp(-OD)``).

Tissue types differ by morphology, not only colour (see ``TISSUE_TYPES``):

- ``tumour``: crowded, large, pleomorphic, hyperchromatic nuclei in pale cytoplasm;
- ``stroma``: eosinophilic collagen fibres with sparse spindle-shaped nuclei along them;
- ``glandular``: glands (a ring of columnar nuclei around a pale lumen) in stroma;
- ``adipose``: large empty polygonal fat cells with thin membranes, almost no nuclei.

All sizes are physical (µm) and converted with the slide's µm/px, so a slide "scanned" at
0.25 µm/px shows the same tissue at twice the pixels.

:func:`write_cohort` writes a cohort with slide-level labels (a tumour focus or none) for
slide-level heads (:mod:`scratchpath.synthetic.cohort`).
"""

from scratchpath.synthetic.cohort import CohortSlide, write_cohort
from scratchpath.synthetic.render import TISSUE_TYPES, StainProfile, SyntheticSlide
from scratchpath.synthetic.tiff import pyramid_shapes, write_slide, write_tile_set

__all__ = [
    "TISSUE_TYPES",
    "CohortSlide",
    "StainProfile",
    "SyntheticSlide",
    "pyramid_shapes",
    "write_cohort",
    "write_slide",
    "write_tile_set",
]
