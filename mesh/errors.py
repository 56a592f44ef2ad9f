"""The one exception base of the mesh."""


class MeshError(Exception):
    """Bad configuration or a misuse of the mesh API (never raised for bad network input)."""


class ConfigError(MeshError, ValueError):
    """peers.yaml is invalid; the message names the field and the bad value."""


class WireError(MeshError):
    """A message could not be decoded. `reason` is the drop-counter name (garbage, truncated, ...).

    Raised only by `wire.decode`; the mesh catches it at the socket boundary, counts it and drops
    the message, so it never reaches the event loop.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
