"""The image store: pulls images, keeps their records and blobs, and turns each image into
the one read-only erofs file that every pod VM maps.

Layout under the image root (default /var/lib/clearcri/images)::

    blobs/sha256/<hex>   verified content (manifests, configs, layers), shared by images
    tmp/                 blobs being downloaded
    unpack/              layer trees being turned into erofs files
    rootfs/<hex>.erofs   one read-only rootfs per image (hex of the image id)

Image records (names, config, layer list) live in the SQLite state (``cri.store``).
An image becomes visible only in the transaction that follows the download (and,
with ``unpack_on_pull``, the erofs build) of everything it needs; ``recover()`` at
start removes whatever an interrupted pull left behind.

Concurrency: one event loop. Pulls of the same reference (with the same credentials)
share one operation; downloads of the same blob share one transfer; the erofs file of
an image is built under a per-image lock in a worker thread. Blobs a running pull
holds are leased and never garbage-collected under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cri.images.auth import Credentials
from cri.images.content import ContentStore
from cri.images.errors import (
    ContentVerificationError,
    ImageError,
    ImageNotFound,
    InvalidImageReference,
    RegistryPermissionDenied,
    RegistryUnauthenticated,
    RegistryUnavailable,
    UnsupportedImage,
)
from cri.images.hosts import RegistryHosts
from cri.images.manifest import (
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    choose_platform,
    parse_manifest,
)
from cri.images.reference import (
    Reference,
    ReferenceError,
    is_image_id,
    parse_reference,
)
from cri.images.registry import FetchedManifest, RegistryClient, Repository
from cri.images.rootfs import build_rootfs_image, image_id_for
from cri.images.unpack import LayerSource, UnpackLimits, read_image_file, unpack_layers
from cri.images.users import ImageUser, resolve_user
from cri.store import Store
from sandbox.api import RootfsImage

log = logging.getLogger(__name__)

DEFAULT_IMAGE_ROOT = Path("/var/lib/clearcri/images")
DEFAULT_PLATFORM = Platform("linux", "amd64")
PARALLEL_DOWNLOADS = 3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageRecord:
    """One local image."""

    id: str  # the config digest, "sha256:..."
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    config: ImageConfig
    manifest_digest: str
    layers: tuple[Descriptor, ...]
    pinned: bool
    created_ns: int

    @property
    def rootfs_id(self) -> str:
        """The short id of the image's rootfs device (a QEMU id, a guest dir name)."""
        return image_id_for(self.id)


@dataclass(frozen=True)
class FilesystemUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


@dataclass
class ImageStoreStats:
    """Counters for tests and metrics."""

    pulls: int = 0
    manifest_fetches: int = 0
    blob_downloads: int = 0
    blob_bytes: int = 0
    rootfs_builds: int = 0


@dataclass
class _PullState:
    ref: Reference
    repo: Repository
    top: FetchedManifest
    blobs: dict[str, Descriptor] = field(default_factory=dict)


class ImageStore:
    """Local images: pull, list, look up, remove, and their shared rootfs files."""

    def __init__(
        self,
        store: Store,
        root: Path = DEFAULT_IMAGE_ROOT,
        *,
        hosts: RegistryHosts | None = None,
        platform: Platform = DEFAULT_PLATFORM,
        limits: UnpackLimits | None = None,
        unpack_on_pull: bool = True,
        registry: RegistryClient | None = None,
    ) -> None:
        self.db = store
        self.root = root
        self.platform = platform
        self.limits = limits or UnpackLimits()
        self.unpack_on_pull = unpack_on_pull
        self.registry = registry or RegistryClient(hosts)
        self.content = ContentStore(root)
        self.rootfs_dir = root / "rootfs"
        self.unpack_dir = root / "unpack"
        self.stats = ImageStoreStats()
        self._pulls: dict[tuple[str, str], asyncio.Future[ImageRecord]] = {}
        self._downloads: dict[str, asyncio.Future[None]] = {}
        self._leases: Counter[str] = Counter()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._builds_running = 0
        # called with (succeeded, seconds) after every pull (cri/metrics.py)
        self.pull_observer: Callable[[bool, float], None] | None = None
        self.recover()

    # -- lifecycle ------------------------------------------------------------------

    def recover(self) -> None:
        """Drop what an interrupted pull or build left: temp blobs, unpack trees, stray
        rootfs files, and blobs no image uses. Called once at construction."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.content.prepare()
        shutil.rmtree(self.unpack_dir, ignore_errors=True)
        self.unpack_dir.mkdir(mode=0o700, exist_ok=True)
        self.rootfs_dir.mkdir(exist_ok=True)
        self.garbage_collect()

    async def aclose(self) -> None:
        await self.registry.aclose()

    @contextlib.contextmanager
    def _lease(self, digests: set[str]) -> Iterator[None]:
        self._leases.update(digests)
        try:
            yield
        finally:
            self._leases.subtract(digests)
            for d in digests:
                if self._leases[d] <= 0:
                    del self._leases[d]

    def _image_lock(self, image_id: str) -> asyncio.Lock:
        lock = self._image_locks.get(image_id)
        if lock is None:
            lock = self._image_locks[image_id] = asyncio.Lock()
        return lock

    def rootfs_path(self, image_id: str) -> Path:
        return self.rootfs_dir / f"{image_id.split(':', 1)[1]}.erofs"

    # -- lookups (cheap indexed SQLite reads, run on the loop) ------------------------

    def _record(self, image_id: str) -> ImageRecord | None:
        row = self.db.query_one("SELECT * FROM images WHERE id = ?", (image_id,))
        if row is None:
            return None
        refs = self.db.query(
            "SELECT ref, kind FROM image_refs WHERE image_id = ? ORDER BY ref", (image_id,)
        )
        return _record_from_row(row, refs)

    def get(self, ref_or_id: str) -> ImageRecord | None:
        """The image named by a reference, an image id (``sha256:...`` or 64 hex) or a
        repo digest; None if there is none. Raises InvalidImageReference if malformed."""
        image_id = self._resolve_id(ref_or_id)
        return self._record(image_id) if image_id else None

    def _resolve_id(self, ref_or_id: str) -> str | None:
        if is_image_id(ref_or_id):
            image_id = ref_or_id if ref_or_id.startswith("sha256:") else f"sha256:{ref_or_id}"
            row = self.db.query_one("SELECT id FROM images WHERE id = ?", (image_id,))
            # an unknown id: a 64-hex string is never a name, so there is nothing else
            # to look up (and RemoveImage/ImageStatus answer "not found", not an error)
            return str(row["id"]) if row is not None else None
        ref = _parse(ref_or_id)
        row = self.db.query_one("SELECT image_id FROM image_refs WHERE ref = ?", (str(ref),))
        if row is None and ref.tag and ref.digest:
            row = self.db.query_one(
                "SELECT image_id FROM image_refs WHERE ref = ?",
                (str(ref.with_digest(ref.digest)),),
            )
        return str(row["image_id"]) if row else None

    def list(self) -> list[ImageRecord]:
        rows = self.db.query("SELECT * FROM images ORDER BY created_ns")
        refs: dict[str, list[sqlite3.Row]] = {}
        for ref_row in self.db.query("SELECT ref, kind, image_id FROM image_refs ORDER BY ref"):
            refs.setdefault(ref_row["image_id"], []).append(ref_row)
        return [_record_from_row(row, refs.get(row["id"], [])) for row in rows]

    def image_config(self, image_id: str) -> ImageConfig:
        """The OCI config (Entrypoint, Cmd, Env, WorkingDir, User, ...) of an image."""
        record = self.get(image_id)
        if record is None:
            raise ImageNotFound(f"image {image_id} is not present; pull it first")
        return record.config

    def set_pinned(self, image_id: str, pinned: bool) -> None:
        """Mark an image pinned (kubelet's image GC leaves it alone), e.g. the pause image."""
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE images SET pinned = ? WHERE id = ?", (int(pinned), image_id))
            if cur.rowcount == 0:
                raise ImageNotFound(f"image {image_id} is not present")

    # -- pull -----------------------------------------------------------------------

    async def pull(
        self,
        text: str,
        credentials: Credentials | None = None,
        progress: Progress | None = None,
    ) -> ImageRecord:
        """Pull ``text`` (a reference) and return the local image.

        Concurrent pulls of the same reference with the same credentials share one
        operation; it continues if one of its callers is cancelled.
        """
        ref = _parse(text)
        key = (str(ref), credentials.fingerprint() if credentials else "")
        running = self._pulls.get(key)
        if running is None:
            running = asyncio.ensure_future(self._pull(ref, credentials, progress))
            self._pulls[key] = running

            def finished(fut: asyncio.Future[ImageRecord]) -> None:
                self._pulls.pop(key, None)
                if not fut.cancelled():
                    fut.exception()  # retrieved here so an abandoned pull does not warn

            running.add_done_callback(finished)
        return await asyncio.shield(running)

    async def _pull(
        self, ref: Reference, credentials: Credentials | None, progress: Progress | None
    ) -> ImageRecord:
        started = time.monotonic()
        try:
            record = await self._pull_once(ref, credentials, progress)
        except BaseException:
            # a failed pull keeps nothing: drop the blobs it fetched that no image uses
            self.garbage_collect()
            if self.pull_observer is not None:
                self.pull_observer(False, time.monotonic() - started)
            raise
        if self.pull_observer is not None:
            self.pull_observer(True, time.monotonic() - started)
        return record

    async def _pull_once(
        self, ref: Reference, credentials: Credentials | None, progress: Progress | None
    ) -> ImageRecord:
        started = time.monotonic()
        self.stats.pulls += 1
        state = await self._resolve(ref, credentials)
        top_desc = Descriptor(state.top.media_type, state.top.digest, len(state.top.data))
        parsed = parse_manifest(state.top.data, state.top.media_type, str(ref))
        blobs_in_memory: dict[str, tuple[Descriptor, bytes]] = {
            top_desc.digest: (top_desc, state.top.data)
        }
        manifest_desc = top_desc
        if isinstance(parsed, Index):
            chosen = choose_platform(parsed, self.platform, str(ref))
            fetched = await state.repo.get_manifest(chosen.digest, expected=chosen)
            self.stats.manifest_fetches += 1
            parsed = parse_manifest(fetched.data, fetched.media_type or chosen.media_type, str(ref))
            if isinstance(parsed, Index):
                raise UnsupportedImage(f"{ref}: an index inside an index is not supported")
            manifest_desc = chosen
            blobs_in_memory[chosen.digest] = (chosen, fetched.data)
        assert isinstance(parsed, Manifest)
        manifest: Manifest = parsed
        image_id = manifest.config.digest
        needed = {top_desc.digest, manifest_desc.digest, image_id}
        needed.update(layer.digest for layer in manifest.layers)
        with self._lease(needed):
            if self.content.exists(manifest.config):
                config_data = self.content.read(image_id)
            else:
                config_data = await state.repo.get_blob(manifest.config, MAX_CONFIG_BYTES)
            config = ImageConfig.from_json(config_data, f"{ref} ({image_id})")
            if config.diff_ids and len(config.diff_ids) != len(manifest.layers):
                raise ContentVerificationError(
                    f"{ref}: the config lists {len(config.diff_ids)} layers, the manifest "
                    f"{len(manifest.layers)}; the image is corrupt"
                )
            await self._download_layers(state.repo, manifest.layers, progress)
            for desc, data in blobs_in_memory.values():
                self.content.put(desc, data, f"manifest {desc.digest} of {ref}")
            self.content.put(manifest.config, config_data, f"config {image_id} of {ref}")
            size = manifest_desc.size + manifest.config.size + sum(d.size for d in manifest.layers)
            async with self._image_lock(image_id):
                users: tuple[str, str] | None = None
                if self.unpack_on_pull and not self._rootfs_ready(image_id):
                    users = await self._build_rootfs(image_id, manifest.layers, config)
                repo_digest = str(ref.with_digest(top_desc.digest))
                tag = None if ref.digest else str(ref)
                self._commit(
                    image_id,
                    manifest_digest=manifest_desc.digest,
                    size=size,
                    config=config_data.decode(),
                    layers=manifest.layers,
                    blobs=needed,
                    repo_digest=repo_digest,
                    tag=tag,
                    users=users,
                )
        self.garbage_collect()
        record = self._record(image_id)
        assert record is not None
        elapsed = time.monotonic() - started
        log.info(
            "image pulled ref=%s id=%s size=%d seconds=%.2f endpoint=%s",
            ref,
            image_id,
            size,
            elapsed,
            state.repo.endpoint.url,
        )
        if progress:
            progress(f"pulled {ref} ({size / 2**20:.1f} MiB) in {elapsed:.2f}s")
        return record

    async def _resolve(self, ref: Reference, credentials: Credentials | None) -> _PullState:
        """Fetch the top manifest from the first endpoint that has it."""
        failures: list[tuple[Repository, ImageError]] = []
        for repo in self.registry.repositories(ref, credentials):
            try:
                top = await repo.get_manifest(ref.object)
            except (
                ImageNotFound,
                RegistryUnavailable,
                RegistryUnauthenticated,
                RegistryPermissionDenied,
            ) as exc:
                log.info("image resolve ref=%s endpoint=%s failed: %s", ref, repo.endpoint.url, exc)
                failures.append((repo, exc))
                continue
            self.stats.manifest_fetches += 1
            return _PullState(ref, repo, top)
        raise _combine_failures(ref, failures)

    async def _download_layers(
        self, repo: Repository, layers: tuple[Descriptor, ...], progress: Progress | None
    ) -> None:
        gate = asyncio.Semaphore(PARALLEL_DOWNLOADS)

        async def one(desc: Descriptor) -> None:
            async with gate:
                await self._download(repo, desc, progress)

        unique = {d.digest: d for d in layers}
        tasks = [asyncio.ensure_future(one(desc)) for desc in unique.values()]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _download(
        self, repo: Repository, desc: Descriptor, progress: Progress | None
    ) -> None:
        """Make blob ``desc`` present; concurrent requests for one blob share a transfer."""
        while True:
            if self.content.exists(desc):
                return
            running = self._downloads.get(desc.digest)
            if running is None:
                break
            # the transfer's owner reports its own failure; here we look again
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._downloads[desc.digest] = future
        try:
            await self._transfer(repo, desc, progress)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ImageError("cancelled"))
            future.exception()
            raise
        else:
            future.set_result(None)
        finally:
            self._downloads.pop(desc.digest, None)

    async def _transfer(
        self, repo: Repository, desc: Descriptor, progress: Progress | None
    ) -> None:
        what = f"layer {desc.digest} of {repo.where}"
        policy = self.registry.retry
        with self.content.writer(desc, what) as writer:
            attempt = 0
            while True:
                try:
                    async with repo.open_blob(desc) as body:
                        async for chunk in body:
                            writer.write(chunk)
                    break
                except (httpx.TransportError, RegistryUnavailable) as exc:
                    attempt += 1
                    if attempt >= policy.attempts:
                        raise RegistryUnavailable(
                            f"downloading {what} failed {attempt} times: {exc}"
                        ) from exc
                    log.info("blob %s download interrupted (%s); retrying", desc.digest, exc)
                    writer.reset()
                    await asyncio.sleep(policy.delay(attempt - 1))
            await asyncio.to_thread(writer.commit)
        self.stats.blob_downloads += 1
        self.stats.blob_bytes += desc.size
        if progress:
            progress(f"fetched {desc.digest[:19]} ({desc.size / 2**20:.1f} MiB)")

    def _commit(
        self,
        image_id: str,
        *,
        manifest_digest: str,
        size: int,
        config: str,
        layers: tuple[Descriptor, ...],
        blobs: set[str],
        repo_digest: str,
        tag: str | None,
        users: tuple[str, str] | None,
    ) -> None:
        layer_json = json.dumps([d.to_json() for d in layers])
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO images (id, manifest_digest, size, config, layers, created_ns) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (image_id, manifest_digest, size, config, layer_json, time.time_ns()),
            )
            if users is not None:
                conn.execute(
                    "UPDATE images SET passwd = ?, grp = ? WHERE id = ?", (*users, image_id)
                )
            conn.executemany(
                "INSERT OR IGNORE INTO image_blobs (image_id, digest) VALUES (?, ?)",
                [(image_id, d) for d in sorted(blobs)],
            )
            refs = [(repo_digest, "digest")] + ([(tag, "tag")] if tag else [])
            for ref, kind in refs:
                conn.execute(
                    "INSERT INTO image_refs (ref, image_id, kind) VALUES (?, ?, ?) "
                    "ON CONFLICT(ref) DO UPDATE SET image_id = excluded.image_id",
                    (ref, image_id, kind),
                )
            # an image whose last name moved to another image is gone
            conn.execute("DELETE FROM images WHERE id NOT IN (SELECT image_id FROM image_refs)")

    # -- rootfs ---------------------------------------------------------------------

    def _rootfs_ready(self, image_id: str) -> bool:
        if not self.rootfs_path(image_id).exists():
            return False
        row = self.db.query_one("SELECT passwd FROM images WHERE id = ?", (image_id,))
        return row is not None and row["passwd"] is not None

    async def rootfs_image(self, image_id: str) -> RootfsImage:
        """The image's read-only erofs rootfs, built on first use and shared afterwards."""
        record = self.get(image_id)
        if record is None:
            raise ImageNotFound(f"image {image_id} is not present; pull it first")
        async with self._image_lock(record.id):
            if not self._rootfs_ready(record.id):
                users = await self._build_rootfs(record.id, record.layers, record.config)
                with self.db.transaction() as conn:
                    conn.execute(
                        "UPDATE images SET passwd = ?, grp = ? WHERE id = ?", (*users, record.id)
                    )
                if self.get(record.id) is None:  # removed while building
                    self.rootfs_path(record.id).unlink(missing_ok=True)
                    raise ImageNotFound(f"image {image_id} was removed")
        return RootfsImage(record.rootfs_id, self.rootfs_path(record.id))

    async def _build_rootfs(
        self, image_id: str, layers: tuple[Descriptor, ...], config: ImageConfig
    ) -> tuple[str, str]:
        """Unpack the layers into a temp tree, build the erofs file, drop the tree.

        Returns the image's /etc/passwd and /etc/group ("" when missing).
        """
        sources = [
            LayerSource(
                self.content.path(d.digest),
                d.digest,
                config.diff_ids[i] if i < len(config.diff_ids) else None,
            )
            for i, d in enumerate(layers)
        ]
        for source in sources:
            if not source.path.exists():
                raise ImageNotFound(
                    f"layer {source.digest} of image {image_id} is missing from the store; "
                    "remove the image and pull it again"
                )
        tree = self.unpack_dir / f"{image_id.split(':', 1)[1][:16]}-{secrets.token_hex(4)}"
        dest = self.rootfs_path(image_id)
        short_id = image_id_for(image_id)
        limits = self.limits

        def build() -> tuple[str, str]:
            try:
                unpack_layers(tree, sources, limits)
                passwd = read_image_file(tree, "etc/passwd") or ""
                group = read_image_file(tree, "etc/group") or ""
                dest.unlink(missing_ok=True)
                build_rootfs_image(tree, dest, image_id=short_id)
                return passwd, group
            finally:
                shutil.rmtree(tree, ignore_errors=True)

        started = time.monotonic()
        self._builds_running += 1
        try:
            users = await asyncio.to_thread(build)
        finally:
            self._builds_running -= 1
        self.stats.rootfs_builds += 1
        log.info(
            "image rootfs built id=%s file=%s seconds=%.2f",
            image_id,
            dest,
            time.monotonic() - started,
        )
        return users

    async def resolve_user(self, image_id: str, user: str | None = None) -> ImageUser:
        """uid, gid and supplementary gids of ``user`` (default: the image config's User)
        from the image's /etc/passwd and /etc/group."""
        record = self.get(image_id)
        if record is None:
            raise ImageNotFound(f"image {image_id} is not present; pull it first")
        spec = record.config.user if user is None else user
        row = self.db.query_one("SELECT passwd, grp FROM images WHERE id = ?", (record.id,))
        if row is None or row["passwd"] is None:
            await self.rootfs_image(record.id)
            row = self.db.query_one("SELECT passwd, grp FROM images WHERE id = ?", (record.id,))
            if row is None:
                raise ImageNotFound(f"image {image_id} was removed")
        return resolve_user(spec, row["passwd"] or "", row["grp"] or "")

    # -- removal --------------------------------------------------------------------

    async def remove(self, ref_or_id: str) -> bool:
        """Remove an image, or one of its tags.

        By id or repo digest: the image and all its names. By tag: only that tag when
        the image has other tags, else the image. Returns False if nothing matched.
        """
        if not is_image_id(ref_or_id):
            ref = _parse(ref_or_id)
            row = self.db.query_one(
                "SELECT image_id, kind FROM image_refs WHERE ref = ?", (str(ref),)
            )
            if row is None:
                return False
            image_id = str(row["image_id"])
            if row["kind"] == "tag":
                tags = self.db.query(
                    "SELECT ref FROM image_refs WHERE image_id = ? AND kind = 'tag'", (image_id,)
                )
                if len(tags) > 1:
                    with self.db.transaction() as conn:
                        conn.execute("DELETE FROM image_refs WHERE ref = ?", (str(ref),))
                    log.info("image untagged ref=%s id=%s", ref, image_id)
                    return True
        else:
            found = self._resolve_id(ref_or_id)
            if found is None:
                return False
            image_id = found
        async with self._image_lock(image_id):
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            self.rootfs_path(image_id).unlink(missing_ok=True)
        self.garbage_collect()
        log.info("image removed id=%s", image_id)
        return True

    def garbage_collect(self) -> int:
        """Delete blobs and rootfs files no image uses; return how many files went.

        Runs on the loop: a directory listing and a few unlinks, with no await between
        the lease check and the unlink (a concurrent pull cannot lose a blob).
        """
        used = {str(r["digest"]) for r in self.db.query("SELECT DISTINCT digest FROM image_blobs")}
        removed = 0
        for digest in self.content.digests() - used:
            if digest in self._leases:
                continue
            self.content.delete(digest)
            removed += 1
        images = {str(r["id"]).split(":", 1)[1] for r in self.db.query("SELECT id FROM images")}
        for path in self.rootfs_dir.iterdir():
            if path.name.startswith("."):
                if self._builds_running:
                    continue  # a build in progress owns its temporary file
            elif path.name.removesuffix(".erofs") in images:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    async def filesystem_usage(self) -> FilesystemUsage:
        """Bytes and inodes used under the image root (walked in a worker thread)."""

        def walk() -> tuple[int, int]:
            seen: set[tuple[int, int]] = set()
            used = 0
            for dirpath, dirnames, filenames in os.walk(self.root):
                for name in (*dirnames, *filenames):
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                    used += st.st_blocks * 512
            return used, len(seen)

        used, inodes = await asyncio.to_thread(walk)
        return FilesystemUsage(str(self.root), used, inodes, time.time_ns())


def _parse(text: str) -> Reference:
    try:
        return parse_reference(text)
    except ReferenceError as exc:
        raise InvalidImageReference(str(exc)) from exc


def _record_from_row(row: sqlite3.Row, refs: list[sqlite3.Row]) -> ImageRecord:
    layers = tuple(
        Descriptor(str(d.get("mediaType", "")), str(d["digest"]), int(d["size"]))
        for d in json.loads(row["layers"])
    )
    return ImageRecord(
        id=str(row["id"]),
        repo_tags=tuple(str(r["ref"]) for r in refs if r["kind"] == "tag"),
        repo_digests=tuple(str(r["ref"]) for r in refs if r["kind"] == "digest"),
        size=int(row["size"]),
        config=ImageConfig.from_json(str(row["config"]).encode(), str(row["id"])),
        manifest_digest=str(row["manifest_digest"]),
        layers=layers,
        pinned=bool(row["pinned"]),
        created_ns=int(row["created_ns"]),
    )


def _combine_failures(ref: Reference, failures: list[tuple[Repository, ImageError]]) -> ImageError:
    """One error for a pull that no endpoint could serve, of the most telling kind."""
    if not failures:
        return RegistryUnavailable(f"no endpoint configured for {ref.domain}")
    order: list[type[ImageError]] = [
        RegistryPermissionDenied,
        RegistryUnauthenticated,
        ImageNotFound,
        RegistryUnavailable,
    ]
    for kind in order:
        for _repo, exc in failures:
            if isinstance(exc, kind):
                if len(failures) == 1:
                    return exc
                others = "; ".join(f"{r.endpoint.url}: {e}" for r, e in failures if e is not exc)
                return kind(f"{exc} (also tried: {others})")
    return failures[0][1]
