"""Container images: references, registry client, content store, unpacking, and the CRI
ImageService. Each image becomes one read-only erofs file shared by every pod VM."""

from cri.images.auth import Credentials
from cri.images.errors import ImageError, ImageNotFound, InvalidImageReference
from cri.images.hosts import RegistryHosts
from cri.images.manifest import ImageConfig, Platform
from cri.images.reference import Reference, parse_reference
from cri.images.store import DEFAULT_IMAGE_ROOT, ImageRecord, ImageStore
from cri.images.users import ImageUser, UserNotFound

__all__ = [
    "DEFAULT_IMAGE_ROOT",
    "Credentials",
    "ImageConfig",
    "ImageError",
    "ImageNotFound",
    "ImageRecord",
    "ImageStore",
    "ImageUser",
    "InvalidImageReference",
    "Platform",
    "Reference",
    "RegistryHosts",
    "UserNotFound",
    "parse_reference",
]
