"""Meta-training (Algorithm 1)."""
