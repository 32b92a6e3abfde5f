"""Where to fetch an image from: per-registry mirrors and transport settings.

This is the daemon's ``[registry]`` config table, in the spirit of containerd's
``hosts.toml``::

    [registry]
    insecure = ["registry.lab:5000"]          # HTTPS without verification, then plain HTTP

    [registry.mirrors."registry.k8s.io"]
    endpoints = ["http://127.0.0.1:5000"]     # tried in order, before the registry itself

    [registry.configs."registry.corp"]
    ca_file = "/etc/clearcri/corp-ca.pem"     # extra CA bundle for this host
    insecure_skip_verify = false

An image keeps its canonical name whichever endpoint serves it. Registries on loopback
addresses (``localhost:5000``, ``127.0.0.1:5000``, ``[::1]:5000``) are reached over plain
HTTP without any config, as Docker allows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cri.images.errors import HostsConfigError
from cri.images.reference import DEFAULT_DOMAIN

DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"


@dataclass(frozen=True)
class Endpoint:
    """One base URL to try for a registry."""

    url: str  # scheme://host[:port][/prefix], no trailing slash
    host: str  # host[:port] of the URL (for credentials and logs)
    verify: bool | str  # TLS verification: True, False, or a CA bundle path
    mirror: bool

    def api(self, path: str) -> str:
        """The URL of ``/v2/<path>`` on this endpoint."""
        base = self.url if self.url.endswith("/v2") else self.url + "/v2"
        return f"{base}/{path.lstrip('/')}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``[::1]``, with or without a port."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class RegistryHosts:
    """Per-registry mirrors and transport settings (the ``[registry]`` config table)."""

    mirrors: dict[str, list[str]] = field(default_factory=dict)
    insecure: set[str] = field(default_factory=set)
    ca_files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> RegistryHosts:
        """Build from the parsed TOML ``[registry]`` table (see the module docstring)."""
        if not isinstance(table, Mapping):
            raise HostsConfigError("[registry] must be a table")
        known = {"mirrors", "insecure", "configs"}
        unknown = set(table) - known
        if unknown:
            raise HostsConfigError(
                f"unknown keys in [registry]: {', '.join(sorted(unknown))} "
                f"(expected {', '.join(sorted(known))})"
            )
        hosts = cls()
        mirrors = table.get("mirrors", {})
        if not isinstance(mirrors, Mapping):
            raise HostsConfigError("[registry.mirrors] must be a table of registry hosts")
        for registry, entry in mirrors.items():
            where = f'[registry.mirrors."{registry}"]'
            if not isinstance(entry, Mapping) or not isinstance(entry.get("endpoints"), list):
                raise HostsConfigError(f'{where} needs endpoints = ["http://host:port", ...]')
            endpoints = []
            for url in entry["endpoints"]:
                if not isinstance(url, str):
                    raise HostsConfigError(f"{where}: endpoint {url!r} is not a string")
                endpoints.append(_check_url(url, where))
            hosts.mirrors[_canonical_registry(registry)] = endpoints
        insecure = table.get("insecure", [])
        if not isinstance(insecure, list) or not all(isinstance(h, str) for h in insecure):
            raise HostsConfigError('[registry] insecure must be a list of "host[:port]" strings')
        hosts.insecure.update(insecure)
        configs = table.get("configs", {})
        if not isinstance(configs, Mapping):
            raise HostsConfigError("[registry.configs] must be a table of registry hosts")
        for host, entry in configs.items():
            where = f'[registry.configs."{host}"]'
            if not isinstance(entry, Mapping):
                raise HostsConfigError(f"{where} must be a table")
            extra = set(entry) - {"ca_file", "insecure_skip_verify"}
            if extra:
                raise HostsConfigError(f"{where}: unknown keys {', '.join(sorted(extra))}")
            if "ca_file" in entry:
                if not isinstance(entry["ca_file"], str):
                    raise HostsConfigError(f"{where}: ca_file must be a path string")
                hosts.ca_files[host] = Path(entry["ca_file"])
            skip = entry.get("insecure_skip_verify", False)
            if not isinstance(skip, bool):
                raise HostsConfigError(f"{where}: insecure_skip_verify must be true or false")
            if skip:
                hosts.insecure.add(host)
        return hosts

    def verify_for(self, host: str) -> bool | str:
        if host in self.ca_files:
            return str(self.ca_files[host])
        return host not in self.insecure

    def endpoints(self, domain: str) -> list[Endpoint]:
        """Endpoints for registry ``domain``, in the order to try them: mirrors first."""
        result: list[Endpoint] = []
        for url in self.mirrors.get(_canonical_registry(domain), []):
            result.extend(self._url_endpoints(url, mirror=True))
        if domain == DEFAULT_DOMAIN:
            result.extend(self._url_endpoints(DOCKER_HUB_ENDPOINT, mirror=False))
        elif is_loopback_host(domain) and domain not in self.ca_files:
            result.append(Endpoint(f"http://{domain}", domain, False, mirror=False))
        elif domain in self.insecure:
            result.append(Endpoint(f"https://{domain}", domain, False, mirror=False))
            result.append(Endpoint(f"http://{domain}", domain, False, mirror=False))
        else:
            result.append(Endpoint(f"https://{domain}", domain, self.verify_for(domain), False))
        return result

    def _url_endpoints(self, url: str, *, mirror: bool) -> list[Endpoint]:
        if "://" not in url:
            host = url.split("/", 1)[0]
            if is_loopback_host(host) and host not in self.ca_files:
                return [Endpoint(f"http://{url}".rstrip("/"), host, False, mirror)]
            if host in self.insecure:
                return [
                    Endpoint(f"https://{url}".rstrip("/"), host, False, mirror),
                    Endpoint(f"http://{url}".rstrip("/"), host, False, mirror),
                ]
            url = f"https://{url}"
        parts = urlsplit(url)
        host = parts.netloc
        verify: bool | str = False if parts.scheme == "http" else self.verify_for(host)
        return [Endpoint(url.rstrip("/"), host, verify, mirror)]


def _canonical_registry(name: str) -> str:
    return DEFAULT_DOMAIN if name in ("index.docker.io", "registry-1.docker.io") else name


def _check_url(url: str, where: str) -> str:
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise HostsConfigError(f"{where}: endpoint {url!r} must be http(s)://host[:port]")
    elif not url or url.startswith("/"):
        raise HostsConfigError(f"{where}: endpoint {url!r} must be http(s)://host[:port]")
    return url
