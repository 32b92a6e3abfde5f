"""Users and groups of an image: resolve ``user[:group]`` with its /etc/passwd and /etc/group.

The same rules as Docker and containerd: a numeric user needs no passwd entry (its
primary group is then 0 unless the passwd file knows it); a user name must exist; a
group (name or number) after ``:`` replaces the primary group; supplementary groups
are the groups of /etc/group that list the user by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol import ErrorCode
from cri.images.errors import ImageError

MAX_ID = 2**32 - 2


class UserNotFound(ImageError):
    """The image has no such user or group (FAILED_PRECONDITION for the container)."""

    code = ErrorCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class ImageUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    name: str = ""
    home: str = "/"


def _fields(text: str, count: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= count:
            rows.append(parts)
    return rows


def _int(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value <= MAX_ID:
            return value
    return None


def parse_passwd(text: str) -> list[PasswdEntry]:
    entries = []
    for parts in _fields(text, 7):
        uid, gid = _int(parts[2]), _int(parts[3])
        if uid is not None and gid is not None:
            entries.append(PasswdEntry(parts[0], uid, gid, parts[5]))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    entries = []
    for parts in _fields(text, 4):
        gid = _int(parts[2])
        if gid is not None:
            members = tuple(m for m in parts[3].split(",") if m)
            entries.append(GroupEntry(parts[0], gid, members))
    return entries


def resolve_user(spec: str, passwd: str, group: str) -> ImageUser:
    """Resolve ``spec`` (``""``, ``name``, ``uid``, ``name:group``, ``uid:gid``...)."""
    users = parse_passwd(passwd)
    groups = parse_group(group)
    user_part, _, group_part = spec.partition(":")
    user_part = user_part or "0"
    uid = _int(user_part)
    entry: PasswdEntry | None
    if uid is not None:
        entry = next((u for u in users if u.uid == uid), None)
    else:
        entry = next((u for u in users if u.name == user_part), None)
        if entry is None:
            raise UserNotFound(
                f"user {user_part!r} is not in the image's /etc/passwd; use a numeric uid "
                "or add the user to the image"
            )
        uid = entry.uid
    gid = entry.gid if entry else 0
    if group_part:
        number = _int(group_part)
        if number is not None:
            gid = number
        else:
            found = next((g for g in groups if g.name == group_part), None)
            if found is None:
                raise UserNotFound(
                    f"group {group_part!r} is not in the image's /etc/group; use a numeric gid "
                    "or add the group to the image"
                )
            gid = found.gid
    name = entry.name if entry else ""
    extra: list[int] = []
    if name:
        for g in groups:
            if name in g.members and g.gid != gid and g.gid not in extra:
                extra.append(g.gid)
    return ImageUser(uid, gid, tuple(extra), name, entry.home if entry else "/")
