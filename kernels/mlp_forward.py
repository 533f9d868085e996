# kaas: signature: mlp_forward(x: float32[batch, d_in], w1: float32[d_in, hidden], b1: float32[hidden], w2: float32[hidden, d_out], b2: float32[d_out])
# kaas: doc: two dense layers with a ReLU between them: relu(x @ w1 + b1) @ w2 + b2
import jax.numpy as jnp


def mlp_forward(x, w1, b1, w2, b2):
    hidden = jnp.maximum(x @ w1 + b1, 0.0)
    return hidden @ w2 + b2
