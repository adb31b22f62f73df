"""Bits of the MASK output plane.

A pixel's value is the OR of these flags.  Candidates are never taken where
any of ``EXCLUDE_CANDIDATE`` is set (COSMIC included: cosmic-ray pixels are
filled with noise like other bad pixels, but not grown); ``EDGE`` is informational (the kernel
footprint reaches outside the image, which is filled with noise there).
"""
from enum import IntFlag

__all__ = ["MaskBit", "EXCLUDE_CANDIDATE"]


class MaskBit(IntFlag):
    BAD_NEW = 1      #: NaN/Inf/BLANK in the new image (or its variance)
    BAD_REF = 2      #: NaN/Inf/BLANK in the reference image (or its variance)
    SATURATED = 4    #: at or above SATURATE in either image
    USER = 8         #: non-zero in a user mask file
    NEAR = 16        #: within the kernel footprint of a pixel flagged above
    EDGE = 32        #: within the kernel footprint of the image border
    OUTSIDE = 64     #: outside the image (internal; never in a written core)
    COSMIC = 128     #: cosmic-ray hit detected in either single exposure


EXCLUDE_CANDIDATE = int(MaskBit.BAD_NEW | MaskBit.BAD_REF | MaskBit.SATURATED
                        | MaskBit.USER | MaskBit.NEAR | MaskBit.OUTSIDE | MaskBit.COSMIC)
