"""Training-side pieces: train state and steps, checkpoints, weight import."""
