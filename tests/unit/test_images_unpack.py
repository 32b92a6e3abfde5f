"""Applying layers: whiteouts, links, ownership, modes, xattrs, and hostile tars."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from cri.images.errors import ContentVerificationError, UnsafeLayer
from cri.images.unpack import (
    LayerSource,
    UnpackLimits,
    read_image_file,
    resolve_in_root,
    unpack_layers,
)
from tests.registry import Entry, Layer


def _apply(
    tmp_path: Path, *layers: Layer, limits: UnpackLimits | None = None, check: bool = True
) -> Path:
    sources = []
    for i, layer in enumerate(layers):
        blob = tmp_path / f"layer{i}"
        blob.write_bytes(layer.blob)
        sources.append(LayerSource(blob, layer.digest, layer.diff_id if check else None))
    root = tmp_path / "root"
    unpack_layers(root, sources, limits)
    return root


def _dir(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, "dir", mode=mode)


def test_files_dirs_links_modes_and_owners(tmp_path: Path) -> None:
    root = _apply(
        tmp_path,
        Layer(
            [
                _dir("etc"),
                Entry("etc/hello", data=b"hi", mode=0o640, uid=1000, gid=33),
                Entry("etc/setuid", data=b"x", mode=0o4755),
                _dir("tmp", 0o1777),
                Entry("etc/link", "symlink", linkname="/etc/hello"),
                Entry("etc/hard", "hardlink", linkname="etc/hello"),
                Entry("etc/fifo", "fifo", mode=0o600),
                Entry("dev/null", "chardev", mode=0o666),  # parent created implicitly
                Entry("etc/caps", data=b"", xattrs={"user.clearcri": "yes"}),
            ]
        ),
    )
    hello = root / "etc/hello"
    st = hello.stat()
    assert hello.read_bytes() == b"hi"
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1000, 33)
    assert stat.S_IMODE((root / "etc/setuid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(root / "etc/link") == "/etc/hello"
    assert (root / "etc/hard").stat().st_ino == st.st_ino
    assert stat.S_ISFIFO((root / "etc/fifo").lstat().st_mode)
    if os.geteuid() == 0:
        assert stat.S_ISCHR((root / "dev/null").lstat().st_mode)
    try:
        assert os.getxattr(root / "etc/caps", "user.clearcri") == b"yes"
    except OSError:
        pytest.skip("user xattrs unsupported on this filesystem")


def test_whiteouts_remove_lower_files_and_dirs(tmp_path: Path) -> None:
    lower = Layer(
        [
            _dir("a"),
            Entry("a/keep", data=b"1"),
            Entry("a/gone", data=b"2"),
            _dir("a/sub"),
            Entry("a/sub/deep", data=b"3"),
            Entry("top", data=b"4"),
        ]
    )
    upper = Layer(
        [
            Entry("a/.wh.gone"),
            Entry("a/.wh.sub"),
            Entry(".wh.top"),
            Entry(".wh.never-existed"),
        ]
    )
    root = _apply(tmp_path, lower, upper)
    assert sorted(os.listdir(root / "a")) == ["keep"]
    assert not (root / "top").exists()
    assert not (root / ".wh.top").exists()


def test_opaque_dir_hides_lower_but_keeps_own_entries(tmp_path: Path) -> None:
    lower = Layer(
        [_dir("d"), Entry("d/old", data=b"o"), _dir("d/olddir"), Entry("d/olddir/f", data=b"x")]
    )
    # the opaque marker comes after this layer's own files: they must survive
    upper = Layer(
        [_dir("d"), Entry("d/new", data=b"n"), Entry("d/.wh..wh..opq"), Entry("other", data=b"")]
    )
    root = _apply(tmp_path, lower, upper)
    assert sorted(os.listdir(root / "d")) == ["new"]


def test_replacing_types_across_layers(tmp_path: Path) -> None:
    lower = Layer([_dir("x"), Entry("x/f", data=b"1"), Entry("y", data=b"file")])
    upper = Layer([Entry("x", data=b"now a file"), _dir("y"), Entry("y/inner", data=b"2")])
    root = _apply(tmp_path, lower, upper)
    assert (root / "x").read_bytes() == b"now a file"
    assert (root / "y/inner").read_bytes() == b"2"


def test_symlinked_dirs_inside_root_are_followed(tmp_path: Path) -> None:
    # merged /usr: lib -> usr/lib; a later layer writes lib/x
    lower = Layer([_dir("usr"), _dir("usr/lib"), Entry("lib", "symlink", linkname="usr/lib")])
    upper = Layer([Entry("lib/x", data=b"in usr/lib"), Entry("abs", "symlink", linkname="/usr")])
    third = Layer([Entry("abs/lib/y", data=b"via absolute link")])
    root = _apply(tmp_path, lower, upper, third)
    assert (root / "usr/lib/x").read_bytes() == b"in usr/lib"
    assert (root / "usr/lib/y").read_bytes() == b"via absolute link"
    assert os.path.islink(root / "lib")


def test_an_existing_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious")
    lower = Layer([Entry("f", "symlink", linkname=str(outside))])
    upper = Layer([Entry("f", data=b"overwritten")])
    root = _apply(tmp_path, lower, upper)
    assert outside.read_text() == "precious"
    assert (root / "f").read_bytes() == b"overwritten" and not (root / "f").is_symlink()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry("../escape", data=b"x")], "'..'"),
        ([Entry("a/../../escape", data=b"x")], "'..'"),
        ([Entry("/etc/passwd", data=b"x")], "absolute"),
        (
            [Entry("up", "symlink", linkname="../../.."), Entry("up/escape", data=b"x")],
            "leaves the image root",
        ),
        (
            [
                _dir("d"),
                Entry("d/up", "symlink", linkname="../.."),
                Entry("d/up/tmp/escape", data=b"x"),
            ],
            "leaves the image root",
        ),
        ([Entry("h", "hardlink", linkname="../../etc/passwd")], "'..'"),
        ([Entry("h", "hardlink", linkname="/etc/passwd")], "absolute"),
        (
            [Entry("up", "symlink", linkname="../.."), Entry("h", "hardlink", linkname="up/x")],
            "leaves the image root",
        ),
        ([Entry("h", "hardlink", linkname="missing")], "does not exist"),
        ([_dir("d"), Entry("h", "hardlink", linkname="d")], "directory"),
        ([Entry("f", data=b""), Entry("f/g", data=b"")], "not a directory"),
        (
            [Entry("loop", "symlink", linkname="loop"), Entry("loop/x", data=b"")],
            "too many symlinks",
        ),
    ],
)
def test_hostile_layers_are_refused(tmp_path: Path, entries: list[Entry], message: str) -> None:
    with pytest.raises(UnsafeLayer, match=message):
        _apply(tmp_path, Layer(entries))
    for path in tmp_path.parent.rglob("escape"):
        pytest.fail(f"{path} was written outside the root")


def test_symlink_to_absolute_outside_path_stays_inside(tmp_path: Path) -> None:
    # "/tmp" inside the image is root/tmp, never the host's /tmp
    marker = f"clearcri-unpack-{os.getpid()}"
    root = _apply(
        tmp_path,
        Layer([Entry("t", "symlink", linkname="/tmp"), Entry(f"t/{marker}", data=b"x")]),
    )
    assert (root / "tmp" / marker).exists()
    assert not Path("/tmp", marker).exists()


def test_size_and_entry_limits(tmp_path: Path) -> None:
    big = Layer([Entry("big", data=b"x" * 100_000)])
    with pytest.raises(UnsafeLayer, match="more than 50000 bytes"):
        _apply(tmp_path, big, limits=UnpackLimits(max_bytes=50_000))
    shutil.rmtree(tmp_path / "root")
    many = Layer([Entry(f"f{i}", data=b"") for i in range(20)])
    with pytest.raises(UnsafeLayer, match="more than 10 entries"):
        _apply(tmp_path, many, limits=UnpackLimits(max_entries=10))
    shutil.rmtree(tmp_path / "root")
    with pytest.raises(UnsafeLayer, match="name longer"):
        _apply(tmp_path, Layer([Entry("n" * 300, data=b"")]), limits=UnpackLimits(max_name=200))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_and_diff_id_check(tmp_path: Path, compression: str) -> None:
    if compression == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    root = _apply(tmp_path, Layer([Entry("f", data=b"content")], compression))
    assert (root / "f").read_bytes() == b"content"


def test_diff_id_mismatch_is_reported(tmp_path: Path) -> None:
    layer = Layer([Entry("f", data=b"content")])
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob)
    wrong = LayerSource(blob, layer.digest, "sha256:" + "0" * 64)
    with pytest.raises(ContentVerificationError, match="unpacks to"):
        unpack_layers(tmp_path / "root", [wrong])


def test_garbage_is_not_a_tar(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(UnsafeLayer, match="not a valid"):
        unpack_layers(tmp_path / "root", [LayerSource(blob, "sha256:" + "1" * 64, None)])


def test_read_image_file_follows_links_inside(tmp_path: Path) -> None:
    root = _apply(
        tmp_path,
        Layer(
            [
                _dir("etc"),
                Entry("etc/real", data=b"root:x:0:0::/:/bin/sh\n"),
                Entry("etc/passwd", "symlink", linkname="/etc/real"),
                Entry("etc/group", "symlink", linkname="../../../../host-file"),
            ]
        ),
    )
    assert read_image_file(root, "etc/passwd") == "root:x:0:0::/:/bin/sh\n"
    assert read_image_file(root, "etc/group") is None
    assert read_image_file(root, "etc/missing") is None
    with pytest.raises(UnsafeLayer):
        resolve_in_root(root, "etc/group", follow_final=True)


@pytest.mark.parametrize("whiteout", [".wh..", ".wh...", "d/.wh..", "d/.wh...", ".wh."])
def test_whiteouts_of_dot_entries_are_refused(tmp_path: Path, whiteout: str) -> None:
    """``.wh..`` and ``.wh...`` named the directory itself or its parent: at a layer's
    root, the shared unpack directory of every conversion in flight."""
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    with pytest.raises(UnsafeLayer, match="names no entry"):
        _apply(tmp_path, Layer([_dir("d"), Entry("d/keep", data=b"x"), Entry(whiteout)]))
    assert sibling.is_dir(), "a whiteout removed a directory beside the image root"
    assert (tmp_path / "root").is_dir()


def _sparse_layer(name: str, real_size: int) -> bytes:
    """A PAX (GNU 1.0) sparse member: a few bytes of tar data that unpack to real_size."""
    import io
    import tarfile

    sparse_map = b"1\n0\n4\n".ljust(512, b"\0")  # one chunk: 4 bytes at offset 0
    data = sparse_map + b"data"
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(real_size),
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def test_a_sparse_member_counts_at_its_full_size(tmp_path: Path) -> None:
    """A tiny layer whose sparse member declares a huge file is refused by the budget
    before anything is written (it once wrote 5.9 GB for 142 bytes of gzip)."""
    blob = tmp_path / "layer0"
    blob.write_bytes(_sparse_layer("big", 1 << 30))
    root = tmp_path / "root"
    with pytest.raises(UnsafeLayer, match="unpack to more than 50000 bytes"):
        unpack_layers(root, [LayerSource(blob, "sha256:x", None)], UnpackLimits(max_bytes=50_000))
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) == 0
    # within the budget it unpacks whole
    shutil.rmtree(root)
    blob.write_bytes(_sparse_layer("small", 10_000))
    unpack_layers(root, [LayerSource(blob, "sha256:x", None)], UnpackLimits(max_bytes=50_000))
    assert (root / "small").read_bytes() == b"data" + b"\0" * 9_996
