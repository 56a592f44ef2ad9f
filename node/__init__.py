"""RobustDiCE node: composes the partitioner and the mesh into a running daemon and the CLI."""
