"""RobustDiCE offline half: importance scores, clustering, replication, plans and shards."""
