"""The one exception base of the partitioner; every error it raises on bad input derives from it."""


class PartitionerError(Exception):
    """Bad input to the partitioner: a model, plan, shard, option or data folder."""


class ModelError(PartitionerError):
    """A model that cannot be built, traced or split (names the layer)."""


class PlanError(PartitionerError):
    """A plan that is corrupt, from another model, or does not match its shards."""


class DataError(PartitionerError):
    """A data or calibration folder that is missing, empty or holds unreadable files (names it)."""
