"""CurveZMQ for the producer -> trainer stream (libzmq's built-in CURVE, keys via ``zmq.auth``).

Roles: the **receiver (trainer side) is the CURVE server** and every producer is a
CURVE client, whichever side binds. CURVE roles are independent of bind/connect,
and authentication (ZAP) runs on the server side, so making the receiver the
server is what lets a trainer refuse producers whose public key is not on its
allow-list: a refused peer never completes the handshake, so none of its
messages reach the socket, let alone the buffer. All trainer ranks share one
receiver key pair; producers need only its public half.

Key layout written by ``scripts/gen_curve_keys.py`` (``zmq.auth.create_certificates``)::

    <dir>/receiver.key            receiver public key   (give to producers)
    <dir>/receiver.key_secret     receiver secret key   (trainer hosts only)
    <dir>/producers/<name>.key_secret, <name>.key    one pair per producer
    <dir>/allowed/<name>.key      allow-list: producer public keys the receivers accept
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def generate_keys(out_dir: str | os.PathLike, producer_names: list[str], allow: bool = True) -> dict[str, Path]:
    """Write the receiver key pair (unless present) and one pair per producer name.

    With ``allow`` the producers' public keys are copied into ``<dir>/allowed``.
    Returns the paths by role (``receiver``, ``receiver_secret``, ``allowed``, and
    ``producer:<name>`` for each secret file).
    """
    out = Path(out_dir)
    (out / "producers").mkdir(parents=True, exist_ok=True)
    (out / "allowed").mkdir(parents=True, exist_ok=True)
    paths = {"receiver": out / "receiver.key", "receiver_secret": out / "receiver.key_secret", "allowed": out / "allowed"}
    if not paths["receiver_secret"].exists():
        zmq.auth.create_certificates(out, "receiver")
    for name in producer_names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"producer_names must be plain file names, got {name!r}")
        public, secret = zmq.auth.create_certificates(out / "producers", name)
        os.chmod(secret, 0o600)
        if allow:
            shutil.copy(public, out / "allowed" / f"{name}.key")
        paths[f"producer:{name}"] = Path(secret)
    os.chmod(paths["receiver_secret"], 0o600)
    return paths


def load_key(path: str | os.PathLike, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a zmq certificate file, with errors that name the file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read CURVE key file {str(path)!r}: {err}") from None
    if need_secret and secret is None:
        raise ValueError(f"CURVE key file {str(path)!r} holds no secret key (use the .key_secret file)")
    return public, secret


def make_curve_server(sock: zmq.Socket, server_secret_file: str | os.PathLike) -> None:
    """Make ``sock`` a CURVE server with the receiver key pair (before bind/connect)."""
    public, secret = load_key(server_secret_file, need_secret=True)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def make_curve_client(
    sock: zmq.Socket, client_secret_file: str | os.PathLike, server_public_file: str | os.PathLike
) -> None:
    """Make ``sock`` a CURVE client with its own key pair and the receiver's public key."""
    public, secret = load_key(client_secret_file, need_secret=True)
    server_public, _ = load_key(server_public_file, need_secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def start_authenticator(ctx: zmq.Context, allow_dir: str | os.PathLike) -> ThreadAuthenticator:
    """A ZAP handler for ``ctx`` accepting exactly the public keys in ``allow_dir/*.key``.

    The caller stops it (``auth.stop()``) before terminating the context. The
    directory is read once; restart the receiver to change the allow-list.
    """
    if not Path(allow_dir).is_dir():
        raise ValueError(f"curve_allow_dir {str(allow_dir)!r} is not a directory")
    if not list(Path(allow_dir).glob("*.key")):
        raise ValueError(f"curve_allow_dir {str(allow_dir)!r} holds no *.key files: no producer could connect")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allow_dir))
    return auth
