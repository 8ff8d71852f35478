"""Datastore files over the `/folder` HTTPS interface, or a local mount of the same datastore.

Reads are ranged GETs, writes are streaming PUTs, both with the SOAP session cookie.
Where the datastore is mounted on this host (`site.datastore_mounts`) the same files
are read and written locally: same interface, no HTTP.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol
from urllib.parse import quote

import requests

from vmrep.errors import NotFound, TransientError, VSphereError
from vmrep.vsphere.connection import Client, http_session, http_verify


def parse_ds_path(path: str) -> tuple[str, str]:
    """'[ds1] vm/disk.vmdk' -> ('ds1', 'vm/disk.vmdk')."""
    if not path.startswith("[") or "]" not in path:
        raise ValueError(f"not a datastore path: {path!r}")
    ds, _, rel = path[1:].partition("]")
    return ds, rel.strip()


def flat_path(descriptor: str) -> str:
    """The flat extent that holds a disk's bytes: 'x.vmdk' -> 'x-flat.vmdk'."""
    return descriptor[:-5] + "-flat.vmdk" if descriptor.endswith(".vmdk") else descriptor


class DatastoreFiles(Protocol):
    def size(self, path: str) -> int: ...
    def read(self, path: str, offset: int, length: int) -> bytes: ...
    def write(self, path: str, chunks: Iterable[bytes], size: int) -> None: ...
    def delete(self, path: str) -> None: ...
    def exists(self, path: str) -> bool: ...


class HttpDatastore:
    """One datacenter's datastores through `/folder`, authenticated by the session cookie."""

    def __init__(self, client: Client, datacenter: str) -> None:
        self.client = client
        self.datacenter = datacenter
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = http_session(self.client.site)
        name, value = self.client.session_cookie
        s.cookies.set(name, value)
        return s

    def _url(self, path: str) -> tuple[str, dict[str, str]]:
        ds, rel = parse_ds_path(path)
        host = f"{self.client.host}:{self.client.port}"
        return f"https://{host}/folder/{quote(rel)}", {"dcPath": self.datacenter, "dsName": ds}

    def _request(self, method: str, path: str, *, attempts: int | None = None,
                 body: Callable[[], Any] | None = None, **kw: Any) -> requests.Response:
        """One request through `Client.call`; `body` makes the request body anew for each attempt."""
        url, params = self._url(path)

        def go() -> requests.Response:
            data = {"data": body()} if body is not None else {}
            r = self._session().request(method, url, params=params, timeout=self.client.site.timeout_seconds,
                                        verify=http_verify(self.client.site), **data, **kw)
            if r.status_code == 401:
                # The cookie went stale with the session: log in again, then retry.
                self.client.relogin()
                raise TransientError(f"{path}: session expired")
            if r.status_code in (502, 503, 504):
                raise TransientError(f"{path}: HTTP {r.status_code}")
            return r

        return self.client.call(path, go, method_name=f"DatastoreFile.{method}", attempts=attempts)

    def size(self, path: str) -> int:
        r = self._request("GET", path, headers={"Range": "bytes=0-0"}, stream=True)
        r.close()
        if r.status_code == 404:
            raise NotFound(f"datastore file {path} not found")
        cr = r.headers.get("Content-Range")
        if cr and "/" in cr:
            return int(cr.rsplit("/", 1)[1])
        return int(r.headers.get("Content-Length", "0"))

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except NotFound:
            return False

    def read(self, path: str, offset: int, length: int) -> bytes:
        r = self._request("GET", path, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if r.status_code == 404:
            raise NotFound(f"datastore file {path} not found")
        if r.status_code not in (200, 206):
            raise VSphereError(f"reading {path}: HTTP {r.status_code}")
        data = r.content
        if r.status_code == 200:  # server ignored the range
            data = data[offset : offset + length]
        if len(data) < length:
            data += bytes(length - len(data))  # past the flat file's end reads as zeros
        return data

    def write(self, path: str, chunks: Iterable[bytes], size: int) -> None:
        """Streaming PUT of exactly `size` bytes. A list of chunks is sent again on a
        retry; a one-shot iterator cannot be, so its first transient failure is raised
        (as TransientError) for the caller's step to start the stream anew."""
        replayable = isinstance(chunks, (list, tuple, bytes))
        if isinstance(chunks, bytes):
            chunks = [chunks]

        # A one-shot stream gets one attempt, for this call only: the client's policy is
        # shared with the other threads (write steps run in parallel per VM).
        r = self._request("PUT", path, body=lambda: _SizedStream(iter(chunks), size),
                          headers={"Content-Type": "application/octet-stream"},
                          attempts=None if replayable else 1)
        if r.status_code not in (200, 201, 204):
            raise VSphereError(f"writing {path}: HTTP {r.status_code}")

    def delete(self, path: str) -> None:
        r = self._request("DELETE", path)
        if r.status_code not in (200, 204, 404):
            raise VSphereError(f"deleting {path}: HTTP {r.status_code}")


class _SizedStream:
    """A file-like view of a chunk iterator with a known length, so requests sends a
    Content-Length and streams the body (a bare generator would be sent chunked, which
    the datastore interface does not take)."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        self._chunks = chunks
        self._buf = b""
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


class LocalDatastore:
    """The same interface over a datastore mounted on this host."""

    def __init__(self, mounts: dict[str, Path]) -> None:
        self.mounts = mounts

    def local(self, path: str) -> Path:
        ds, rel = parse_ds_path(path)
        try:
            return Path(self.mounts[ds]) / rel
        except KeyError:
            raise NotFound(f"datastore {ds} is not mounted locally") from None

    def size(self, path: str) -> int:
        try:
            return self.local(path).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"datastore file {path} not found") from None

    def exists(self, path: str) -> bool:
        return self.local(path).exists()

    def read(self, path: str, offset: int, length: int) -> bytes:
        with open(self.local(path), "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        return data + bytes(length - len(data)) if len(data) < length else data

    def write(self, path: str, chunks: Iterable[bytes], size: int) -> None:
        target = self.local(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".vmrep-tmp")
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def delete(self, path: str) -> None:
        try:
            self.local(path).unlink()
        except FileNotFoundError:
            pass


class DatastoreAccess:
    """Local where mounted, else HTTP: callers do not care which."""

    def __init__(self, client: Client, datacenter: str) -> None:
        self.http = HttpDatastore(client, datacenter)
        self.localds = LocalDatastore(client.site.datastore_mounts)

    def _pick(self, path: str) -> DatastoreFiles:
        ds, _ = parse_ds_path(path)
        return self.localds if ds in self.localds.mounts else self.http

    def size(self, path: str) -> int:
        return self._pick(path).size(path)

    def exists(self, path: str) -> bool:
        return self._pick(path).exists(path)

    def read(self, path: str, offset: int, length: int) -> bytes:
        return self._pick(path).read(path, offset, length)

    def write(self, path: str, chunks: Iterable[bytes], size: int) -> None:
        self._pick(path).write(path, chunks, size)

    def delete(self, path: str) -> None:
        self._pick(path).delete(path)

    def is_local(self, path: str) -> bool:
        return self._pick(path) is self.localds

