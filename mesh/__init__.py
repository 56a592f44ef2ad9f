"""RobustDiCE mesh: N-to-N ZeroMQ transport, heartbeats, membership and the per-layer all-gather.

Imports numpy, pyzmq, msgpack and PyYAML, never torch.
"""
from .config import PeerConfig, PeersConfig, ClientKey, load_peers, resolve_self, write_peers
from .errors import ConfigError, MeshError, WireError
from .gather import GatherResult, SliceData
from .membership import MembershipEvent
from .mesh import Mesh

__all__ = ["Mesh", "PeersConfig", "PeerConfig", "ClientKey", "load_peers", "write_peers", "resolve_self",
           "MeshError", "ConfigError", "WireError", "GatherResult", "SliceData", "MembershipEvent"]
