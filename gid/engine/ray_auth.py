"""What a client that a token-protected Ray cluster refuses is told (clusters/README.md, "Who can use the cluster").

Every cluster recipe starts its nodes with ``RAY_AUTH_MODE=token``: Ray 2.60 then checks a shared token on
every request to the cluster. Left to ``ray.init``, a client that sends none, or a wrong one, is retried
for up to a minute, while Ray's C++ client prints a warning per try, and then fails with a
``ConnectionError`` whose cause, if anything, names the reason. So before ``ray.init`` connects,
:func:`check_token` asks the cluster once, with the token Ray would send, and a refusal becomes one line
saying which of three it is (no token sent, another token, token mode without a token) and what to set;
:func:`refusal` reads the same out of ``ray.init``'s exception, should the refusal come there. The token is
never kept, logged or shown: the messages name where Ray would take it from, and whether anything is there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
from ray.exceptions import AuthenticationError

AUTH_MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DOCS = 'clusters/README.md, "Who can use the cluster"'
# What Ray's messages say when the cluster refused a token: the server's reply ("Unauthenticated:
# InvalidAuthToken: Authentication token is missing or incorrect"), or Ray's AuthenticationError by name.
_REFUSED = ("authenticationerror", "invalidauthtoken", "unauthenticated", "authentication token")
# The same gRPC status for another reason: a client that kept the id of a cluster since restarted.
_NOT_A_TOKEN = "wrongclusterid"


def default_token_path() -> Path:
    """Where Ray looks for the token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return Path.home() / ".ray" / "auth_token"


def token_source() -> tuple[str, bool]:
    """Where Ray takes this process's token from, in Ray's order, and whether a token is there (never the token)."""
    if os.environ.get(TOKEN, "").strip():
        return TOKEN, True
    if path := os.environ.get(TOKEN_PATH):
        return f"{TOKEN_PATH}={path}", _holds_text(Path(path))
    return str(default_token_path()), _holds_text(default_token_path())


def _holds_text(path: Path) -> bool:
    try:
        return bool(path.read_bytes().strip())
    except OSError:
        return False


def token_mode() -> bool:
    """Whether this process asks Ray for token authentication (Ray sets the variable itself when it turns it on)."""
    return os.environ.get(AUTH_MODE, "").strip().lower() == "token"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _text(exc: BaseException) -> str:
    try:
        return str(exc).lower()
    except Exception:  # noqa: BLE001 - a message that cannot be built says nothing
        return ""


def is_refusal(exc: BaseException) -> bool:
    """Whether ``ray.init``'s exception means that a token was missing or wrong."""
    for link in _chain(exc):
        if isinstance(link, AuthenticationError):
            return True
        text = _text(link)
        if any(marker in text for marker in _REFUSED) and _NOT_A_TOKEN not in text:
            return True
    return False


def _cluster(address: str | None) -> str:
    if address and address != "auto":
        return f"the Ray cluster at {address}"
    if found := os.environ.get("RAY_ADDRESS"):
        return f"the Ray cluster at {found}"
    return "this node's Ray cluster"


def refused_message(address: str | None) -> str:
    """The line for a client that the cluster at ``address`` refused for its token, by what the client sent."""
    cluster = _cluster(address)
    if not token_mode():
        return (
            f"{cluster} requires a token and this client sends none: set {AUTH_MODE}=token, and {TOKEN_PATH} to the file "
            f"holding the cluster's token unless it is {default_token_path()} ({DOCS})"
        )
    source, found = token_source()
    if not found:
        return no_token_message()
    return (
        f"{cluster} refused this client's token (from {source}): it is not the token the cluster was started with; "
        f"use the cluster's token file ({DOCS})"
    )


def no_token_message() -> str:
    """The line for a client in token mode that has no token (Ray refuses to connect without one)."""
    source, _ = token_source()
    where = (
        f"{source} is missing or empty" if source.startswith(TOKEN_PATH)
        else f"no {TOKEN}, no {TOKEN_PATH} and no {source}"
    )
    return (
        f"{AUTH_MODE}=token but this client has no Ray token ({where}): copy the cluster's token file there, or set "
        f"{TOKEN_PATH} to it ({DOCS})"
    )


def refusal(exc: BaseException, address: str | None) -> str | None:
    """One line for a connection to ``address`` that ``exc`` says was refused for its token; None for other failures."""
    return refused_message(address) if is_refusal(exc) else None


PROBE_TIMEOUT_S = 10


def check_token(address: str | None) -> str | None:
    """Before ``ray.init`` connects to ``address``: the line saying why the cluster refuses this client's token
    (or lack of one), or None when it does not, or cannot be asked (then ``ray.init`` goes on as ever).

    One read from the cluster's GCS (the key Ray's own connect reads first), over Ray's own gRPC channel,
    which adds the token exactly as Ray would send it. Ray Client addresses (``ray://``) are left to Ray.
    """
    if address is not None and address.startswith("ray://"):
        return None
    if token_mode():
        if not token_source()[1]:
            return no_token_message()  # what ray.init refuses before connecting
    elif address in (None, "auto") and token_source()[1]:
        return None  # ray.init turns token mode on itself for a local cluster when it finds a token: let it
    try:
        from ray._private import ray_constants, services

        gcs = services.canonicalize_bootstrap_address(address)
        if gcs is None:
            return None  # a local Ray to start
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        channel = init_grpc_channel(gcs)
    except Exception:  # noqa: BLE001 - whatever stops the question is ray.init's to report
        return None
    try:
        request = gcs_service_pb2.InternalKVGetRequest(key=b"session_name", namespace=ray_constants.KV_NAMESPACE_SESSION)
        gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel).InternalKVGet(request, timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as exc:
        details = (exc.details() or "").lower()
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED and _NOT_A_TOKEN not in details:
            return refused_message(address if address not in (None, "auto") else gcs)
        return None
    except Exception:  # noqa: BLE001 - as above
        return None
    finally:
        channel.close()
    return None
