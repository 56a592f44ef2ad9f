"""Models and data: the built-in models and their shipped weights (weights/), users' own models,
architectures as data, inputs, datasets, training and RoCoIn's students. Imports neither core nor
experiments."""
