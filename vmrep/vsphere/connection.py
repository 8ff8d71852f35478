"""One authenticated session to one site, with TLS verified and transparent re-login.

Every call into vSphere goes through `Client.call`, which retries transient faults
with backoff (logging in again first when the session was lost) and turns permanent
faults into one-line errors naming the object.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import requests
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from vmrep.config import Site
from vmrep.errors import ConnectionFailed, TransientError
from vmrep.vsphere import faults

if TYPE_CHECKING:
    from vmrep.vsphere.tags import Tags

log = logging.getLogger(__name__)
T = TypeVar("T")


# How long a refused connection is tried again when logging in (a vCenter restarting
# refuses for a moment; one that stays down is reported after this).
REFUSED_WINDOW_S = 10.0


@dataclass
class RetryPolicy:
    attempts: int = 5
    initial: float = 0.2
    maximum: float = 5.0


@dataclass
class CallStats:
    """Round trips made through this client, by kind; tests and benchmarks count them."""

    calls: int = 0
    retries: int = 0
    relogins: int = 0
    by_name: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.calls += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1


@dataclass
class ClientCache:
    """What other modules keep for the life of a session, owned here so it goes with the
    client: container views by the sorted names of their types (`property.py`: a view
    is made once per session, so a read is one round trip), and the vAPI tag reader
    (`tags.py`: its REST session logs in once)."""

    views: dict[tuple[str, ...], Any] = field(default_factory=dict)
    tags: "Tags | None" = None


def ssl_context(site: Site) -> ssl.SSLContext:
    tls = site.tls
    if tls.insecure:
        return ssl._create_unverified_context()  # noqa: SLF001 - explicit, per-site choice
    if tls.thumbprint:
        # pyvmomi 9 checks a pin only after chain verification failed, and not on its
        # first request: the context checks the pin itself on every connection.
        return PinnedContext.for_thumbprint(tls.thumbprint)
    if tls.ca_file:
        return ssl.create_default_context(cafile=str(tls.ca_file))
    return ssl.create_default_context()


class PinMismatch(ssl.SSLError):
    """The server's certificate is not the pinned one (a type, so callers need not read
    the message)."""


def _pin_mismatch(exc: BaseException) -> bool:
    """Whether a PinMismatch is `exc` or what it was raised from (pyvmomi may wrap it)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, PinMismatch):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class PinnedContext(ssl.SSLContext):
    """TLS whose only trust is the server certificate's SHA-256, checked on every handshake."""

    pin: str = ""

    @classmethod
    def for_thumbprint(cls, thumbprint: str) -> "PinnedContext":
        ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.pin = thumbprint
        return ctx

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]  # same call, pin checked
        import hashlib

        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest() != self.pin:
            sock.close()
            raise PinMismatch("server certificate does not match the pinned thumbprint")
        return sock


class PinnedAdapter(HTTPAdapter):
    """requests/urllib3 side of a pinned thumbprint: the peer certificate's SHA-256 must match
    (also the journal service's client, `vmrep.journal.remote`: TLS as for vCenter)."""

    def __init__(self, fingerprint: str) -> None:
        self._fp = fingerprint
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["assert_fingerprint"] = self._fp
        return super().init_poolmanager(*args, **kwargs)


def http_session(site: Site) -> requests.Session:
    """A requests session trusting exactly what the site's TLS settings say (datastore
    files and the vAPI endpoint): the CA file, or the pinned thumbprint."""
    s = requests.Session()
    if site.tls.thumbprint:
        s.mount("https://", PinnedAdapter(site.tls.thumbprint))
    return s


def http_verify(site: Site) -> bool | str:
    """`verify=` for each request of an `http_session` (given per request: a session-level
    value loses against REQUESTS_CA_BUNDLE)."""
    if site.tls.thumbprint or site.tls.insecure:
        return False  # the pin is checked by the adapter; insecure is the site's explicit choice
    return str(site.tls.ca_file) if site.tls.ca_file else True


def split_host(host: str) -> tuple[str, int]:
    h = host.removeprefix("https://").split("/", 1)[0]
    if h.startswith("[") and "]" in h:  # IPv6 literal
        addr, _, rest = h[1:].partition("]")
        return addr, int(rest[1:]) if rest.startswith(":") else 443
    if ":" in h:
        addr, port = h.rsplit(":", 1)
        return addr, int(port)
    return h, 443


class Client:
    """A logged-in session to one site."""

    def __init__(self, site: Site, password: str, *, retry: RetryPolicy | None = None,
                 refused_window: float = REFUSED_WINDOW_S) -> None:
        self.site = site
        self.refused_window = refused_window
        self._password = password
        self.retry = retry or RetryPolicy()
        self.stats = CallStats()
        self.cache = ClientCache()
        self._login_lock = threading.Lock()
        self.host, self.port = split_host(site.host)
        self.si = self._connect()
        self.content = self.si.RetrieveContent()

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> Any:
        """Log in. A refused connection (a vCenter or its proxy restarting) is tried again
        for up to `refused_window` seconds; a site that does not answer at all fails after
        one connect timeout, so an unreachable site is reported quickly, in one line."""
        wait_answering(self.site, self.refused_window)
        return self._login()

    def _login(self) -> Any:
        try:
            return SmartConnect(
                host=self.host,
                port=self.port,
                user=self.site.user,
                pwd=self._password,
                sslContext=ssl_context(self.site),
                connectionPoolTimeout=int(self.site.timeout_seconds),
                # Every socket operation bounded (pyvmomi's default is none: a site that
                # accepts and never answers would hold a call forever).
                httpConnectionTimeout=self.site.timeout_seconds,
            )
        except vim.fault.InvalidLogin:
            raise ConnectionFailed(
                f"site {self.site.name}: login refused for user {self.site.user!r} (wrong credentials)"
            ) from None
        except ssl.SSLError as exc:
            if _pin_mismatch(exc):
                raise ConnectionFailed(
                    f"site {self.site.name} ({self.site.host}): server certificate does not match the pinned thumbprint"
                ) from None
            raise ConnectionFailed(
                f"site {self.site.name} ({self.site.host}): TLS verification failed: {exc.__class__.__name__}: "
                f"{getattr(exc, 'verify_message', None) or getattr(exc, 'reason', None) or exc}; "
                f"give tls.ca_file or tls.thumbprint"
            ) from None
        except OSError as exc:
            raise ConnectionFailed(
                f"site {self.site.name} ({self.site.host}): cannot connect: {exc.strerror or exc}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - pyvmomi raises many shapes for a bad endpoint
            if _pin_mismatch(exc):
                raise ConnectionFailed(
                    f"site {self.site.name} ({self.site.host}): server certificate does not match the pinned thumbprint"
                ) from None
            raise ConnectionFailed(
                f"site {self.site.name} ({self.site.host}): cannot connect: {faults.fault_message(exc)}"
            ) from None

    def relogin(self) -> None:
        """Log in again on the same stub, so every object reference stays valid."""
        with self._login_lock:
            self.stats.relogins += 1
            # Log in as a new client: a server that still knows the old cookie would
            # refuse a second login on the same session.
            self.si._stub.cookie = ""  # noqa: SLF001  # pyvmomi has no public way to drop it
            try:
                self.content.sessionManager.Login(self.site.user, self._password)
            except vim.fault.InvalidLogin:
                raise ConnectionFailed(
                    f"site {self.site.name}: login refused for user {self.site.user!r}"
                ) from None
            log.info("site %s: session re-established", self.site.name)

    @property
    def session_cookie(self) -> tuple[str, str]:
        """(name, value) of the SOAP session cookie, for the datastore file interface."""
        raw = self.si._stub.cookie  # noqa: SLF001 - pyvmomi keeps the cookie only here
        cookie = SimpleCookie(raw)
        morsel = cookie.get("vmware_soap_session")
        if morsel is None:
            raise ConnectionFailed(f"site {self.site.name}: no session cookie after login")
        return "vmware_soap_session", morsel.value

    def close(self) -> None:
        try:
            Disconnect(self.si)
        except Exception:  # noqa: BLE001 - closing a dead session is fine
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: Any, method_name: str | None = None,
             attempts: int | None = None, **kwargs: Any) -> T:
        """Run one vSphere call, retrying transient faults; `what` names the object for errors.

        `attempts` overrides the client's policy for this call only (a one-shot stream
        cannot be sent twice): the policy is shared by every thread using the client,
        so a call never changes it."""
        label = method_name or method_label(fn)
        tries = self.retry.attempts if attempts is None else max(1, attempts)

        def before_retry(state: RetryCallState) -> None:
            self.stats.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning("site %s: %s on %s failed transiently (%s), retrying",
                        self.site.name, label, what, exc and faults.fault_name(exc))
            if exc is not None and isinstance(exc, faults.CONNECTION_ERRORS):
                # The connection itself failed: find out once, within the connect timeout,
                # whether the site is there at all, instead of retrying into a site that is gone.
                wait_answering(self.site, self.site.connect_timeout_seconds)
            if exc is not None and faults.is_session_lost(exc):
                self.relogin()

        retrying = Retrying(
            stop=stop_after_attempt(tries),
            wait=wait_random_exponential(multiplier=self.retry.initial, max=self.retry.maximum),
            retry=retry_if_exception(faults.is_transient),
            before_sleep=before_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.stats.count(label)
                    return fn(*args, **kwargs)
        except (ConnectionFailed, TransientError):
            raise
        except Exception as exc:
            if faults.is_transient(exc):
                raise TransientError(
                    f"site {self.site.name}: {label} on {what} still failing after "
                    f"{tries} attempt{'s' if tries != 1 else ''}: {faults.fault_name(exc)}: {faults.fault_message(exc)}"
                ) from exc
            from pyVmomi import vmodl

            if isinstance(exc, vmodl.MethodFault):
                raise faults.as_user_error(exc, f"site {self.site.name}: {what}") from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover


def method_label(fn: Any) -> str:
    """The SOAP method behind a pyVmomi bound method (a lambda closing over it), or the function's name."""
    name = getattr(fn, "__name__", "call")
    if name == "<lambda>" and getattr(fn, "__closure__", None):
        for cell in fn.__closure__:
            info = getattr(cell.cell_contents, "info", None)
            if info is not None and getattr(info, "wsdlName", None):
                return info.wsdlName
    return name


def _answers(host: str, port: int, timeout: float) -> None:
    """One TCP connect and TLS handshake, both within `timeout`: a listener that accepts
    and never answers (a proxy in front of a dead vCenter) times out here instead of
    stalling pyvmomi for the whole request timeout. Only whether the site answers is
    checked: the certificate is verified by the login that follows."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.wrap_socket(sock, server_hostname=host).close()
    finally:
        sock.close()


def wait_answering(site: Site, refused_window: float = REFUSED_WINDOW_S) -> None:
    """Return once the site's endpoint answers; raise ConnectionFailed (one line) when it
    refuses for longer than `refused_window` or does not answer within the site's
    `connect_timeout_seconds`. Bounded by about max(refused_window, connect timeout)."""
    host, port = split_host(site.host)
    timeout = site.connect_timeout_seconds
    deadline = time.monotonic() + refused_window
    delay = 0.25
    while True:
        try:
            _answers(host, port, timeout)
            return
        except ConnectionRefusedError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionFailed(
                    f"site {site.name} ({site.host}): cannot connect: connection refused "
                    f"(still refused after {refused_window:g} s)"
                ) from None
            log.debug("site %s: connection refused; trying again", site.name)  # the outcome is one line
            time.sleep(min(delay, left))
            delay = min(delay * 2, 4.0)
        except (socket.timeout, TimeoutError):
            raise ConnectionFailed(
                f"site {site.name} ({site.host}): cannot connect: no answer within {timeout:g} s"
            ) from None
        except ssl.SSLError as exc:
            # It answered, in TLS: whatever is wrong with it, the login reports it.
            log.debug("site %s: TLS probe: %s", site.name, exc)
            return
        except OSError as exc:
            raise ConnectionFailed(
                f"site {site.name} ({site.host}): cannot connect: {exc.strerror or exc}"
            ) from None


def unreachable(site: Site, refused_window: float | None = None) -> str | None:
    """Why the site cannot be reached now (one line), or None when it answers. Takes at
    most about the site's `connect_timeout_seconds` (a refused connection is retried for
    that long too, unless `refused_window` says otherwise): recovery operations call it
    once and then stay away from a site that is gone, instead of paying every step's
    connect and retries again."""
    try:
        wait_answering(site, site.connect_timeout_seconds if refused_window is None else refused_window)
    except ConnectionFailed as exc:
        return str(exc)
    return None


def connect(site: Site, password: str | None = None, **kw: Any) -> Client:
    if password is None:
        from vmrep.secrets import resolve_secret

        password = resolve_secret(site.password, f"sites.{site.name}.password")
    return Client(site, password, **kw)
