"""Errors of the image subsystem; each class carries the ``ErrorCode`` the service answers."""

from __future__ import annotations

from agent.protocol import CodedError, ErrorCode


class ImageError(CodedError):
    """Base class; the message says what went wrong and what to do about it."""

    code = ErrorCode.INTERNAL


class InvalidImageReference(ImageError):
    """A malformed reference or image id (INVALID_ARGUMENT)."""

    code = ErrorCode.INVALID_ARGUMENT


class ImageNotFound(ImageError):
    """No such image locally, or the registry does not have it (NOT_FOUND)."""

    code = ErrorCode.NOT_FOUND


class RegistryUnauthenticated(ImageError):
    """The registry wants credentials, or rejected the ones given (UNAUTHENTICATED)."""

    code = ErrorCode.UNAUTHENTICATED


class RegistryPermissionDenied(ImageError):
    """The credentials are valid but may not pull this repository (PERMISSION_DENIED)."""

    code = ErrorCode.PERMISSION_DENIED


class RegistryUnavailable(ImageError):
    """The registry cannot be reached or keeps failing (UNAVAILABLE)."""

    code = ErrorCode.UNAVAILABLE


class RegistryProtocolError(ImageError):
    """The registry answered with something we cannot use (FAILED_PRECONDITION)."""

    code = ErrorCode.FAILED_PRECONDITION


class ContentVerificationError(ImageError):
    """Content did not match its digest or size; nothing was stored (DATA_LOSS)."""

    code = ErrorCode.DATA_LOSS


class UnsupportedImage(ImageError):
    """A valid image we cannot run: no linux/amd64 manifest, schema 1, unknown
    compression (FAILED_PRECONDITION)."""

    code = ErrorCode.FAILED_PRECONDITION


class UnsafeLayer(ImageError):
    """A layer tries to write outside the root, or exceeds the size bounds
    (FAILED_PRECONDITION)."""

    code = ErrorCode.FAILED_PRECONDITION


class HostsConfigError(ValueError):
    """The ``[registry]`` table of the daemon config is malformed."""
