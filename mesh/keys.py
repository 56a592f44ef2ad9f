"""CurveZMQ key pairs for the nodes of a mesh."""
from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import Dict, Iterable, Tuple

import zmq
import zmq.auth

from .errors import ConfigError, MeshError


def make_keypairs(out_dir, ids: Iterable[str]) -> Dict[str, str]:
    """Write `<id>.key` and `<id>.key_secret` (mode 600) per id in `out_dir` (mode 700, like
    ~/.ssh); returns {id: public key (Z85)}."""
    if not zmq.has("curve"):
        raise MeshError("this libzmq has no CURVE support; cannot make keys")
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode passes through the umask and leaves an existing folder as it was: a folder
    # of ours left open by an earlier run is closed here too. Someone else's folder is theirs to
    # set (a root-owned keys folder on a board is 0750 so that the service user can enter it).
    if out.stat().st_uid == os.geteuid():
        os.chmod(out, 0o700)
    publics = {}
    for node_id in ids:
        if not node_id or "/" in node_id or node_id.startswith("."):
            raise ConfigError(f"ids: {node_id!r} is not usable as a file name")
        existing = [f for f in (out / f"{node_id}.key", out / f"{node_id}.key_secret") if f.exists()]
        if existing:
            raise ConfigError(f"ids: {node_id!r} already has {existing[0]}; refusing to overwrite a key")
        # The umask keeps the secret unreadable to others from its first byte, not only after chmod.
        old_umask = os.umask(0o077)
        try:
            public_file, secret_file = zmq.auth.create_certificates(out, node_id)
        finally:
            os.umask(old_umask)
        os.chmod(secret_file, 0o600)
        os.chmod(public_file, 0o644)
        public, _ = zmq.auth.load_certificate(public_file)
        publics[node_id] = public.decode("ascii")
    return publics


def load_secret(path) -> Tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `.key_secret` file, refused (as ssh refuses an identity
    file) when group or others may read or change it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise ConfigError(f"secret_key_file: cannot load {path}: {exc}") from None
    if mode & 0o077:
        raise ConfigError(f"secret_key_file: {path} is open to group or others (mode {mode:04o}); "
                          f"a secret key must be its owner's alone: chmod 600 {shlex.quote(str(path))}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"secret_key_file: cannot load {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"secret_key_file: {path} holds no secret key")
    return public, secret


def load_own_keys(config, self_id: str) -> Tuple[bytes, bytes]:
    """(public, secret) of node `self_id` from `config` (a PeersConfig), checked against the
    public key peers.yaml lists for it, so that a node with the wrong key file fails at start."""
    path = config.secret_key_path(self_id)
    public, secret = load_secret(path)
    if public.decode() != config.peer(self_id).public_key:
        raise ConfigError(f"secret_key_file: the public key in {path} is not the one peers.yaml lists for {self_id}")
    return public, secret
