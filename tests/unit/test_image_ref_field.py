"""ImageSpec.image_ref (CRI field 20) written as a raw field the bindings keep."""

from __future__ import annotations

from cri_api.v1 import api_pb2
from google.protobuf.unknown_fields import UnknownFieldSet

from cri.runtime.convert import IMAGE_SPEC_IMAGE_REF, image_spec_with_ref


def image_ref_of(spec: api_pb2.ImageSpec) -> str | None:
    for field in UnknownFieldSet(spec):
        if field.field_number == IMAGE_SPEC_IMAGE_REF:
            data: bytes = field.data
            return data.decode()
    return None


def test_image_ref_survives_copy_and_wire() -> None:
    ref = "sha256:" + "ab" * 32
    spec = image_spec_with_ref(api_pb2.ImageSpec(image="busybox:1", user_specified_image="b"), ref)
    assert spec.image == "busybox:1" and spec.user_specified_image == "b"
    status = api_pb2.ContainerStatus()
    status.mounts.add(container_path="/img").image.CopyFrom(spec)
    back = api_pb2.ContainerStatus()
    back.ParseFromString(status.SerializeToString())
    assert image_ref_of(back.mounts[0].image) == ref
    # the key is field 20, length-delimited (wire type 2): 0xa2 0x01
    assert b"\xa2\x01" + bytes([len(ref)]) + ref.encode() in spec.SerializeToString()


def test_long_refs_use_a_multibyte_length() -> None:
    ref = "x" * 300
    assert image_ref_of(image_spec_with_ref(api_pb2.ImageSpec(), ref)) == ref
