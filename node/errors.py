"""The one exception base of the node."""


class NodeError(Exception):
    """Bad node configuration or start-up failure; the message names the cause."""
