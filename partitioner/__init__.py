"""RobustDiCE offline half, in three rooms whose imports run one way (tests/unit/test_layout.py):

    zoo/          models and data: the built-in models and their shipped weights (zoo/weights/),
                  users' own models, a model's architecture as data, inputs, datasets, students
    core/         the algorithm: importance scores, clustering, budgets, stages, fills, plans,
                  signing, shards and the cluster simulation, RoCoIn; it builds models from the zoo
    experiments/  what measures plans: evaluation, design-space sweeps, fine-tuning

experiments import core and zoo, core imports zoo, the zoo imports neither; errors.py (the one
exception base) and argtypes.py (argparse types of every command) sit beside them and import
none of them; cli.py, the `robustdice partition/evaluate/...` commands, may import all.
"""
