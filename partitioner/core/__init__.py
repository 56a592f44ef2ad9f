"""The partitioning algorithm: scores, clusters, budgets, stages, fills, plans and shards, their
signing and simulation, the default-plan choice and RoCoIn. Imports the zoo, never experiments."""
