"""Pulling from registries that want credentials: bearer tokens and basic auth."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from cri.images.auth import Credentials
from cri.images.errors import RegistryUnauthenticated
from cri.images.store import ImageStore
from cri.store import Store
from tests.registry import (
    TOKEN_USERS,
    RegistryServer,
    TokenServer,
    busybox_layer,
    push_image,
    token_registry,
)

__all__ = ["token_registry"]

ALICE = Credentials.from_auth_config(username="alice", password=TOKEN_USERS["alice"])


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageStore]:
    store = ImageStore(Store(tmp_path / "state.db"), tmp_path / "images")
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
def pushed(token_registry: tuple[RegistryServer, TokenServer]) -> str:
    import asyncio

    server, _ = token_registry
    asyncio.run(
        push_image(server.host, "private/busybox", ["1"], [busybox_layer()], credentials=ALICE)
    )
    return f"{server.host}/private/busybox:1"


async def test_no_credentials(pushed: str, images: ImageStore) -> None:
    with pytest.raises(RegistryUnauthenticated, match="requires authentication"):
        await images.pull(pushed)
    assert images.list() == []


async def test_wrong_password(pushed: str, images: ImageStore) -> None:
    wrong = Credentials.from_auth_config(username="alice", password="wrong")
    with pytest.raises(RegistryUnauthenticated, match="rejected the credentials") as info:
        await images.pull(pushed, wrong)
    assert "wrong" not in str(info.value)
    assert images.list() == []


async def test_username_and_password(pushed: str, images: ImageStore) -> None:
    record = await images.pull(pushed, ALICE)
    assert record.repo_tags == (pushed,)


async def test_auth_field(pushed: str, images: ImageStore) -> None:
    raw = f"alice:{TOKEN_USERS['alice']}".encode()
    creds = Credentials.from_auth_config(auth=base64.b64encode(raw).decode())
    assert (await images.pull(pushed, creds)).repo_tags == (pushed,)


async def test_identity_token(
    pushed: str, images: ImageStore, token_registry: tuple[RegistryServer, TokenServer]
) -> None:
    _, token = token_registry
    refresh = secrets.token_hex(8)
    token.refresh_tokens[refresh] = "alice"
    creds = Credentials.from_auth_config(identity_token=refresh)
    assert (await images.pull(pushed, creds)).repo_tags == (pushed,)
    bad = Credentials.from_auth_config(identity_token="not-a-token")
    await images.remove(pushed)
    with pytest.raises(RegistryUnauthenticated):
        await images.pull(pushed, bad)


async def test_registry_token(
    pushed: str, images: ImageStore, token_registry: tuple[RegistryServer, TokenServer]
) -> None:
    _, token = token_registry
    access = [{"type": "repository", "name": "private/busybox", "actions": ["pull"]}]
    creds = Credentials.from_auth_config(registry_token=token.jwt("alice", access))
    assert (await images.pull(pushed, creds)).repo_tags == (pushed,)
    junk = Credentials.from_auth_config(registry_token="junk")
    await images.remove(pushed)
    with pytest.raises(RegistryUnauthenticated):
        await images.pull(pushed, junk)


async def test_tokens_are_cached(
    pushed: str, images: ImageStore, token_registry: tuple[RegistryServer, TokenServer]
) -> None:
    _, token = token_registry
    before = token.requests
    await images.pull(pushed, ALICE)
    await images.remove(pushed)
    await images.pull(pushed, ALICE)
    assert token.requests - before == 1


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("basic"), htpasswd={"bob": "b0b's password"})
    try:
        yield server
    finally:
        server.stop()


async def test_htpasswd_basic_auth(basic_registry: RegistryServer, images: ImageStore) -> None:
    bob = Credentials.from_auth_config(username="bob", password="b0b's password")
    await push_image(basic_registry.host, "basic/img", ["1"], [busybox_layer()], credentials=bob)
    ref = f"{basic_registry.host}/basic/img:1"
    with pytest.raises(RegistryUnauthenticated, match="requires a username and password"):
        await images.pull(ref)
    with pytest.raises(RegistryUnauthenticated, match="rejected the credentials"):
        await images.pull(ref, Credentials.from_auth_config(username="bob", password="nope"))
    assert (await images.pull(ref, bob)).repo_tags == (ref,)
    # the registry really wants auth (the test is not vacuous)
    assert httpx.get(f"{basic_registry.url}/v2/").status_code == 401
