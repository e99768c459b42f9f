"""sslx: self-supervised visual representation learning in JAX/Flax."""
