"""peers.yaml: one file, the same on every board, loaded into frozen dataclasses.

`load_peers(path)` is the one loader; every problem raises `ConfigError` naming the field and
the bad value, e.g. ``peers[2].port: 70000 is not a port (1-65535)``.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .errors import ConfigError
from .wire import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
Z85_KEY_CHARS = 40  # a 32-byte CurveZMQ key in Z85
_Z85_ALPHABET = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")

DEFAULT_HEARTBEAT_INTERVAL_MS = 100
DEFAULT_PEER_TIMEOUT_MS = 500
# How long a gather waits for a holder that shows no progress on the frame (gather.py). A busy
# live peer is waited for as long as its heartbeats say it works on the frame, and a dead one
# not at all, so this bounds only silence: lost messages, inputs that never arrived. It is
# longer than two TCP retransmissions (200 + 400 ms), which a lossy link needs.
DEFAULT_SYNC_TIMEOUT_MS = 1000
# A frame older than this on a node is answered as expired rather than waited on any longer:
# the bound on a frame's life whatever happens to the network (a queue under overload included).
DEFAULT_FRAME_TIMEOUT_MS = 10000
# Where an engine computes ("compute": auto is cuda when torch sees a GPU) and in which dtype its
# slices travel; every node must put the same dtype on the wire (a mismatch is refused like a plan
# mismatch), where they compute may differ. ("device" is a plan's: a board's index in it.)
COMPUTE_KINDS = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PeerCapacity:
    """A board's capacity as peers.yaml may give it (`robustdice profile` measures one): its
    relative speed and the bytes its shard may take. `partition --capacities peers.yaml` deals
    by it, and a node warns when its plan was dealt for other speeds (node/config.py)."""
    speed: float                           # relative: only ratios between boards count
    memory_bytes: Optional[int] = None     # None: unbounded

    def to_dict(self) -> Dict[str, Any]:
        return {"speed": self.speed, **({} if self.memory_bytes is None else {"memory_bytes": self.memory_bytes})}


@dataclass(frozen=True)
class PeerConfig:
    id: str
    host: str
    port: int
    public_key: Optional[str]
    client_port: int
    metrics_port: Optional[int] = None   # Prometheus metrics over HTTP; None: not served
    capacity: Optional[PeerCapacity] = None

    @property
    def metrics_address(self) -> Optional[Tuple[str, int]]:
        """(address to bind, port) of the metrics server, or None when it is off."""
        return None if self.metrics_port is None else (bind_address(self.host), self.metrics_port)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def client_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ClientKey:
    name: str
    public_key: str


@dataclass(frozen=True)
class PeersConfig:
    peers: Tuple[PeerConfig, ...]
    plan: Optional[Path] = None
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    peer_timeout_ms: int = DEFAULT_PEER_TIMEOUT_MS
    sync_timeout_ms: int = DEFAULT_SYNC_TIMEOUT_MS
    frame_timeout_ms: int = DEFAULT_FRAME_TIMEOUT_MS
    compute: str = "auto"
    dtype: str = "float32"
    insecure: bool = False
    secret_key_file: Optional[str] = None
    # The largest message a node takes. Unless peers.yaml sets it (`max_message_bytes_given`),
    # a node derives its own from its plan once its engine says how large the slices are.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    clients: Tuple[ClientKey, ...] = ()
    base_dir: Path = field(default=Path("."), compare=False)
    version: int = CONFIG_VERSION
    # The operator's Ed25519 public key (base64): a node runs only plans it signed. Required
    # unless insecure: true (node/config.py), since a plan decides what every board computes.
    operator_public_key: Optional[str] = None
    max_message_bytes_given: bool = field(default=False, compare=False)

    def peer(self, node_id: str) -> PeerConfig:
        for p in self.peers:
            if p.id == node_id:
                return p
        raise ConfigError(f"id: {node_id!r} is not in peers ({', '.join(self.ids)})")

    @property
    def ids(self) -> Tuple[str, ...]:
        return tuple(p.id for p in self.peers)

    def secret_key_path(self, node_id: str) -> Path:
        if self.secret_key_file is None:
            raise ConfigError("secret_key_file: missing (required unless insecure: true)")
        path = Path(self.secret_key_file.replace("{id}", node_id))
        return path if path.is_absolute() else self.base_dir / path

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"version": self.version}
        if self.plan is not None:
            out["plan"] = str(self.plan)
        out.update(heartbeat_interval_ms=self.heartbeat_interval_ms, peer_timeout_ms=self.peer_timeout_ms,
                   sync_timeout_ms=self.sync_timeout_ms, frame_timeout_ms=self.frame_timeout_ms,
                   compute=self.compute, dtype=self.dtype, insecure=self.insecure)
        if self.max_message_bytes_given:
            out["max_message_bytes"] = self.max_message_bytes
        if self.secret_key_file is not None:
            out["secret_key_file"] = self.secret_key_file
        if self.operator_public_key is not None:
            out["operator_public_key"] = self.operator_public_key
        if self.clients:
            out["clients"] = [{"name": c.name, "public_key": c.public_key} for c in self.clients]
        out["peers"] = [{k: v for k, v in (("id", p.id), ("host", p.host), ("port", p.port),
                                           ("public_key", p.public_key), ("client_port", p.client_port),
                                           ("metrics_port", p.metrics_port),
                                           ("capacity", p.capacity.to_dict() if p.capacity else None))
                         if v is not None} for p in self.peers]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_TOP_KEYS = {"version", "plan", "heartbeat_interval_ms", "peer_timeout_ms", "sync_timeout_ms", "frame_timeout_ms",
             "compute", "dtype", "insecure",
             "secret_key_file", "operator_public_key", "max_message_bytes", "clients", "peers"}
_PEER_KEYS = {"id", "host", "port", "public_key", "client_port", "metrics_port", "capacity"}
_CAPACITY_KEYS = {"speed", "memory_bytes"}
_CLIENT_KEYS = {"name", "public_key"}


def _unknown(where: str, data: dict, allowed: set) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")


def _int(where: str, value: Any, low: int, high: Optional[int] = None, what: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not an integer")
    if value < low or (high is not None and value > high):
        bound = f"{low}-{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{where}: {value} is not {what or 'in range'} ({bound})")
    return value


def _choice(where: str, value: Any, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _port(where: str, value: Any) -> int:
    return _int(where, value, 1, 65535, "a port")


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not a non-empty string")
    return value


def _key(where: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != Z85_KEY_CHARS or not set(value) <= _Z85_ALPHABET:
        shown = value if not isinstance(value, str) or len(value) < 80 else value[:77] + "..."
        raise ConfigError(f"{where}: {shown!r} is not a {Z85_KEY_CHARS}-character Z85 CurveZMQ public key")
    return value


def parse_peers(data: Any, base_dir: Path = Path(".")) -> PeersConfig:
    """A `PeersConfig` from the parsed YAML mapping; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"peers.yaml: top level is {type(data).__name__}, expected a mapping")
    if "device" in data:
        raise ConfigError("device: is now compute: (auto, cpu or cuda); a device is a board's index in the plan")
    _unknown("peers.yaml", data, _TOP_KEYS)
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"version: {version!r} is not supported (expected {CONFIG_VERSION})")
    heartbeat_ms = _int("heartbeat_interval_ms", data.get("heartbeat_interval_ms", DEFAULT_HEARTBEAT_INTERVAL_MS), 1)
    timeout_ms = _int("peer_timeout_ms", data.get("peer_timeout_ms", DEFAULT_PEER_TIMEOUT_MS), 1)
    if timeout_ms <= heartbeat_ms:
        raise ConfigError(f"peer_timeout_ms: {timeout_ms} must exceed heartbeat_interval_ms ({heartbeat_ms})")
    sync_ms = _int("sync_timeout_ms", data.get("sync_timeout_ms", DEFAULT_SYNC_TIMEOUT_MS), 1)
    frame_ms = _int("frame_timeout_ms", data.get("frame_timeout_ms", DEFAULT_FRAME_TIMEOUT_MS), 1)
    if frame_ms <= sync_ms:
        raise ConfigError(f"frame_timeout_ms: {frame_ms} must exceed sync_timeout_ms ({sync_ms})")
    compute = _choice("compute", data.get("compute", "auto"), COMPUTE_KINDS)
    dtype = _choice("dtype", data.get("dtype", "float32"), DTYPES)
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"insecure: {insecure!r} is not true or false")
    max_bytes_given = data.get("max_message_bytes") is not None
    max_bytes = _int("max_message_bytes", data.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES), 1024)
    plan = data.get("plan")
    if plan is not None:
        plan = Path(_str("plan", plan))
        plan = plan if plan.is_absolute() else base_dir / plan
    secret = data.get("secret_key_file")
    if secret is not None:
        secret = _str("secret_key_file", secret)
    elif not insecure:
        raise ConfigError("secret_key_file: missing (required unless insecure: true)")
    operator_key = data.get("operator_public_key")
    if operator_key is not None:
        operator_key = _operator_key(operator_key)

    clients = []
    raw_clients = data.get("clients") or []
    if not isinstance(raw_clients, list):
        raise ConfigError(f"clients: {raw_clients!r} is not a list")
    for i, c in enumerate(raw_clients):
        where = f"clients[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: {c!r} is not a mapping")
        _unknown(where, c, _CLIENT_KEYS)
        clients.append(ClientKey(_str(f"{where}.name", c.get("name")), _key(f"{where}.public_key", c.get("public_key"))))

    raw_peers = data.get("peers")
    if not isinstance(raw_peers, list) or not raw_peers:
        raise ConfigError(f"peers: {raw_peers!r} is not a non-empty list")
    peers: List[PeerConfig] = []
    seen_ids: Dict[str, int] = {}
    seen_addr: Dict[Tuple[str, int], str] = {}
    for i, p in enumerate(raw_peers):
        where = f"peers[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: {p!r} is not a mapping")
        _unknown(where, p, _PEER_KEYS)
        node_id = _str(f"{where}.id", p.get("id"))
        if node_id in seen_ids:
            raise ConfigError(f"{where}.id: {node_id!r} is a duplicate of peers[{seen_ids[node_id]}].id")
        seen_ids[node_id] = i
        host = _str(f"{where}.host", p.get("host"))
        port = _port(f"{where}.port", p.get("port"))
        client_port = _port(f"{where}.client_port", p.get("client_port", port + 1 if port < 65535 else 0))
        metrics_port = p.get("metrics_port")
        if metrics_port is not None:
            metrics_port = _port(f"{where}.metrics_port", metrics_port)
        for name, value in (("port", port), ("client_port", client_port), ("metrics_port", metrics_port)):
            if value is None:
                continue
            if (host, value) in seen_addr:
                raise ConfigError(f"{where}.{name}: {host}:{value} is already used by {seen_addr[(host, value)]}")
            seen_addr[(host, value)] = f"{where}.{name}"
        key = p.get("public_key")
        if key is None:
            if not insecure:
                raise ConfigError(f"{where}.public_key: missing (required unless insecure: true)")
        else:
            key = _key(f"{where}.public_key", key)
        capacity = None if p.get("capacity") is None else _capacity(f"{where}.capacity", p["capacity"])
        peers.append(PeerConfig(node_id, host, port, key, client_port, metrics_port, capacity))
    keys = [p.public_key for p in peers if p.public_key]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"peers[*].public_key: {dup!r} is listed for more than one peer")
    config = PeersConfig(tuple(peers), plan, heartbeat_ms, timeout_ms, sync_ms, frame_ms, compute, dtype, insecure,
                         secret, max_bytes, tuple(clients), base_dir, version, operator_key, max_bytes_given)
    return config


def _capacity(where: str, value: Any) -> PeerCapacity:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {value!r} is not a mapping (speed, and optionally memory_bytes)")
    _unknown(where, value, _CAPACITY_KEYS)
    speed = value.get("speed")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed <= 0:
        raise ConfigError(f"{where}.speed: {speed!r} is not a positive number")
    memory = value.get("memory_bytes")
    if memory is not None:
        if isinstance(memory, float) and memory.is_integer():
            memory = int(memory)   # 4.0e9 as YAML writes it
        memory = _int(f"{where}.memory_bytes", memory, 1, what="a positive number of bytes")
    return PeerCapacity(float(speed), memory)


def _operator_key(value: Any) -> str:
    """A base64 Ed25519 public key (32 bytes), as `robustdice sign --new-key` prints it."""
    text = _str("operator_public_key", value).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"operator_public_key: {text[:60]!r} is not base64") from None
    if len(raw) != 32:
        raise ConfigError(f"operator_public_key: decodes to {len(raw)} bytes, not the 32 of an Ed25519 public key")
    return text


def load_peers(path) -> PeersConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"peers.yaml: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"peers.yaml: {path} is not valid YAML: {exc}") from None
    config = parse_peers(data, path.resolve().parent)
    if config.insecure:
        log.warning("peers.yaml %s: insecure: true; mesh traffic is neither authenticated nor encrypted", path)
    return config


def write_peers(path, config: PeersConfig) -> Path:
    path = Path(path)
    path.write_text(config.to_yaml())
    return path


def _is_local_address(host: str) -> bool:
    # Binding succeeds only for an address this host owns: cheaper and more portable than
    # enumerating interfaces, and it needs no extra dependency.
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def resolve_self(config: PeersConfig, node_id: Optional[str] = None) -> PeerConfig:
    """This node's entry: by `node_id` when given, else the one peer whose host is local."""
    if node_id is not None:
        return config.peer(node_id)
    local = [p for p in config.peers if _is_local_address(p.host)]
    if not local:
        raise ConfigError(f"id: no peer's host is an address of this machine ({', '.join(p.host for p in config.peers)}); pass --id")
    if len(local) > 1:
        raise ConfigError(f"id: ambiguous, peers {', '.join(p.id for p in local)} all have local hosts; pass --id")
    return local[0]


def bind_endpoint(host: str, port: int) -> str:
    """Where to bind for `host`: the address itself when it is an IP literal, else every interface."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"tcp://*:{port}"
    return f"tcp://{host}:{port}"


def bind_address(host: str) -> str:
    """The address an HTTP server binds for `host` (as `bind_endpoint` does for ZeroMQ)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host
