"""Signed plans: an operator key (Ed25519) vouches for a plan and, through it, for every shard.

What is signed is plan.json's exact bytes. They hold the plan's body, its `plan_hash` and the
`shards` table with each shard's SHA-256, so one signature covers the graph, the assignment and
every weight a board loads: a re-stamped plan (hash recomputed) or a shard with one byte changed
fails. The signature lives beside the plan, in DIR/plan.sig (JSON):

    {"format": "robustdice-plan-signature", "version": 1,
     "public_key": <base64 of the 32-byte Ed25519 verify key>,
     "signature": <base64 of the 64-byte Ed25519 signature of plan.json's bytes>}

`public_key` only names the signer for messages; a board checks against the key its peers.yaml
lists (`operator_public_key`), never against the one in the file. The operator's secret key
stays on the machine that partitions; the deploy copies only the public half to boards.

Key files, like ssh's: OUT/operator.key holds the public key (base64, one line),
OUT/operator.key_secret the 32-byte seed (base64, one line, mode 0600, folder 0700).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Tuple

from robustdice.partitioner.errors import PartitionerError, PlanError

SIGNATURE_FILE = "plan.sig"
SIGNATURE_FORMAT = "robustdice-plan-signature"
SIGNATURE_VERSION = 1
PUBLIC_KEY_FILE = "operator.key"
SECRET_KEY_FILE = "operator.key_secret"
KEY_BYTES = 32


class SigningError(PartitionerError):
    """An operator key that cannot be made, read or used (names the file)."""


def decode_public_key(text: str, where: str = "operator_public_key") -> bytes:
    """The 32 raw bytes of a base64 Ed25519 public key; ValueError naming `where` otherwise."""
    try:
        raw = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: {str(text)[:60]!r} is not base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{where}: decodes to {len(raw)} bytes, not the {KEY_BYTES} of an Ed25519 public key")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def make_operator_key(out_dir) -> Tuple[Path, Path, str]:
    """Write operator.key and operator.key_secret into `out_dir` (made 0700); never overwrites.
    Returns (public file, secret file, public key as base64)."""
    from nacl.signing import SigningKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    public_file, secret_file = out / PUBLIC_KEY_FILE, out / SECRET_KEY_FILE
    for f in (public_file, secret_file):
        if f.exists():
            raise SigningError(f"{f} already exists; refusing to overwrite an operator key")
    key = SigningKey.generate()
    # O_EXCL with mode 0600: the secret is never readable by others, not even for a moment.
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_b64(bytes(key)) + "\n")
    public = _b64(bytes(key.verify_key))
    public_file.write_text(public + "\n")
    os.chmod(public_file, 0o644)
    return public_file, secret_file, public


def load_secret_key(path):
    """The SigningKey in `path`; refuses a file that group or others can read, as ssh does."""
    from nacl.signing import SigningKey

    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise SigningError(f"operator key {path}: cannot read it ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(f"operator key {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                           f"run: chmod 600 {path}")
    try:
        seed = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != KEY_BYTES:
        raise SigningError(f"operator key {path} is not a base64 Ed25519 secret key ({PUBLIC_KEY_FILE}'s "
                           f"secret half, made by `robustdice sign --new-key DIR`)")
    return SigningKey(seed)


def signature_document(body: bytes, secret_key_file) -> str:
    """plan.sig's text: the operator key's signature of `body` (plan.json's bytes)."""
    key = load_secret_key(secret_key_file)
    return json.dumps({"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION,
                       "public_key": _b64(bytes(key.verify_key)), "signature": _b64(key.sign(body).signature)}) + "\n"


def verify_document(body: bytes, document: str, public_key: str, where: str) -> None:
    """Raise PlanError unless `document` (plan.sig's text, read from `where`) is `public_key`'s
    signature of `body`."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        verify_key = VerifyKey(decode_public_key(public_key))
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    try:
        data = json.loads(document)
    except ValueError as exc:
        raise PlanError(f"{where} cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SIGNATURE_FORMAT:
        raise PlanError(f"{where} is not a plan signature")
    try:
        signature = base64.b64decode(str(data.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise PlanError(f"{where}: field signature is not base64") from None
    try:
        verify_key.verify(body, signature)
    except (BadSignatureError, ValueError):
        signer = str(data.get("public_key", "?"))[:12]
        raise PlanError(f"{where}: the plan's signature does not verify with operator_public_key "
                        f"{public_key[:12]}… (signed by {signer}…, or plan.json was changed after signing)") from None
