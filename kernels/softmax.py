# kaas: signature: softmax(x: float32[rows, cols])
# kaas: doc: numerically stable softmax over the last axis
import jax.numpy as jnp


def softmax(x):
    shifted = x - jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=-1, keepdims=True)
