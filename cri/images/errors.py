"""Errors of the image subsystem. Each class stands for one gRPC status the service returns."""

from __future__ import annotations


class ImageError(Exception):
    """Base class; the message says what went wrong and what to do about it."""


class InvalidImageReference(ImageError):
    """A malformed reference or image id (INVALID_ARGUMENT)."""


class ImageNotFound(ImageError):
    """No such image locally, or the registry does not have it (NOT_FOUND)."""


class RegistryUnauthenticated(ImageError):
    """The registry wants credentials, or rejected the ones given (UNAUTHENTICATED)."""


class RegistryPermissionDenied(ImageError):
    """The credentials are valid but may not pull this repository (PERMISSION_DENIED)."""


class RegistryUnavailable(ImageError):
    """The registry cannot be reached or keeps failing (UNAVAILABLE)."""


class RegistryProtocolError(ImageError):
    """The registry answered with something we cannot use (FAILED_PRECONDITION)."""


class ContentVerificationError(ImageError):
    """Content did not match its digest or size; nothing was stored (DATA_LOSS)."""


class UnsupportedImage(ImageError):
    """A valid image we cannot run: no linux/amd64 manifest, schema 1, unknown
    compression (FAILED_PRECONDITION)."""


class UnsafeLayer(ImageError):
    """A layer tries to write outside the root, or exceeds the size bounds
    (FAILED_PRECONDITION)."""


class HostsConfigError(ValueError):
    """The ``[registry]`` table of the daemon config is malformed."""
