"""Which vSphere faults are worth a retry, and how a permanent one reads to a user.

Transient: the connection dropped, the server said 503, the session is gone
(NotAuthenticated: log in again first), or the object is busy (TaskInProgress).
Permanent: everything else, raised at once with the object's name in the message.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any

import requests
from pyVmomi import vim, vmodl

from vmrep.errors import NotFound, TransientError, VSphereError

_TRANSIENT_FAULTS: tuple[type, ...] = (
    vim.fault.NotAuthenticated,
    vim.fault.TaskInProgress,
    vmodl.fault.HostCommunication,
    vim.fault.HostConnectFault,
)
_CONNECTION_ERRORS: tuple[type, ...] = (
    ConnectionError,
    http.client.HTTPException,  # includes RemoteDisconnected, BadStatusLine
    socket.timeout,
    TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    # A pooled connection the server closed meanwhile (a site back after an outage, a
    # vCenter restart): the next request on it fails in TLS; a new connection works.
    ssl.SSLEOFError,
)
CONNECTION_ERRORS = _CONNECTION_ERRORS  # for callers that tell a lost connection from a fault


_FINAL_TLS_TEXTS = ("CERTIFICATE_VERIFY_FAILED", "pinned thumbprint", "Fingerprints did not match")


def is_session_lost(exc: BaseException) -> bool:
    return isinstance(exc, vim.fault.NotAuthenticated)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False  # a certificate that does not verify will not verify on retry either
    if isinstance(exc, requests.exceptions.SSLError):
        # requests wraps both a refused certificate (final) and a connection cut during
        # TLS (SSLEOFError: worth a retry) in the same class; only the text tells them apart.
        # a certificate that does not verify, or is not the pinned one (urllib3's
        # assert_fingerprint: "Fingerprints did not match"), will not on retry either
        text = str(exc)
        return not any(final in text for final in _FINAL_TLS_TEXTS)
    if isinstance(exc, _TRANSIENT_FAULTS):
        return True
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in (502, 503, 504)
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    # pyvmomi turns a non-SOAP 503 answer into a plain Exception with the status in the text
    text = str(exc)
    return "503" in text and "Service Unavailable" in text


def fault_name(exc: BaseException) -> str:
    if isinstance(exc, vmodl.MethodFault):
        return type(exc).__name__.rsplit(".", 1)[-1]
    return type(exc).__name__


def fault_message(exc: BaseException) -> str:
    msg = getattr(exc, "msg", None) or getattr(exc, "faultMessage", None) or str(exc)
    if isinstance(msg, list):
        msg = "; ".join(getattr(m, "message", str(m)) for m in msg) or str(exc)
    return " ".join(str(msg).split())[:300]


def as_user_error(exc: BaseException, what: str) -> VSphereError:
    """A permanent fault as a one-line error that names the object."""
    name = fault_name(exc)
    message = f"{what}: {name}: {fault_message(exc)}"
    if isinstance(exc, (vim.fault.NotFound, vmodl.fault.ManagedObjectNotFound, vim.fault.FileNotFound)):
        return NotFound(message, fault=name)
    return VSphereError(message, fault=name)


def describe(obj: Any) -> str:
    """Name a managed object without a round trip when possible."""
    try:
        return f"{type(obj).__name__.rsplit('.', 1)[-1]}:{obj._moId}"
    except Exception:  # noqa: BLE001 - naming must never fail
        return str(obj)
