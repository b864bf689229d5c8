"""Model-agnostic building blocks: model anatomy, steering hooks, generation, sampling, forwards, the loss."""
