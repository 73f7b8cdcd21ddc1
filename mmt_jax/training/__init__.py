"""Training-side pieces: the train state and step, the trainer that shards and jits it, optimizers."""
