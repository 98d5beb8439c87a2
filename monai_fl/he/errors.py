"""Errors of the HE codec and its NVFlare components (user-facing: one readable line)."""

from monai_fl.errors import MonaiFLError


class HEError(MonaiFLError):
    """Base class of homomorphic-encryption errors."""


class HECodecError(HEError):
    """Codec parameters are inconsistent or a key file does not match them."""


class HEKeyError(HEError):
    """A TenSEAL context is missing, unreadable, or holds the wrong kind of key material."""


class HEContributionError(HEError):
    """A model update or an aggregate cannot be encoded/decoded (shape, NaN, version, tampering)."""
