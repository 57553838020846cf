"""NumPy float64 batch normalization: the independent reference for the tests.

Written from the textbook definitions, without TensorFlow, so that the layer
is never checked against itself.
"""

import numpy as np


def reduction_axes(rank, axis):
    axes = [axis] if isinstance(axis, int) else list(axis)
    axes = sorted(a % rank for a in axes)
    return tuple(a for a in range(rank) if a not in axes), axes


def param_shape(rank, axis, x_shape):
    """Broadcast shape of a per-channel parameter."""
    _, axes = reduction_axes(rank, axis)
    shape = [1] * rank
    for a in axes:
        shape[a] = x_shape[a]
    return shape


def batch_moments(x, axis):
    """Mean and biased variance over all but the `axis` dims, keepdims."""
    x = np.asarray(x, np.float64)
    red, _ = reduction_axes(x.ndim, axis)
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    return mean, var


def bn_forward(x, axis, gamma, beta, epsilon, r=None, d=None):
    """Training-mode output: `gamma * (x_hat * r + d) + beta`."""
    x = np.asarray(x, np.float64)
    shape = param_shape(x.ndim, axis, x.shape)
    mean, var = batch_moments(x, axis)
    x_hat = (x - mean) / np.sqrt(var + epsilon)
    if r is not None:
        x_hat = x_hat * np.reshape(r, shape) + np.reshape(d, shape)
    return np.reshape(gamma, shape) * x_hat + np.reshape(beta, shape)


def bn_inference(x, axis, gamma, beta, mean, var, epsilon):
    x = np.asarray(x, np.float64)
    shape = param_shape(x.ndim, axis, x.shape)
    g = lambda a: np.reshape(np.asarray(a, np.float64), shape)
    return g(gamma) * (x - g(mean)) / np.sqrt(g(var) + epsilon) + g(beta)


def bn_backward(x, dy, axis, gamma, epsilon, r=None, d=None):
    """Gradients of `sum(y * dy)` w.r.t. x, gamma and beta (r, d constant).

    dx = (gamma * r / sigma) * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
    the standard result of differentiating through the batch mean and
    variance.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red, _ = reduction_axes(x.ndim, axis)
    shape = param_shape(x.ndim, axis, x.shape)
    mean, var = batch_moments(x, axis)
    sigma = np.sqrt(var + epsilon)
    x_hat = (x - mean) / sigma
    scale = np.reshape(gamma, shape) / sigma
    if r is not None:
        scale = scale * np.reshape(r, shape)
    dx = scale * (
        dy
        - dy.mean(axis=red, keepdims=True)
        - x_hat * (dy * x_hat).mean(axis=red, keepdims=True)
    )
    if r is not None:
        # y = gamma * (x_hat r + d) + beta: d multiplies gamma too.
        x_hat = x_hat * np.reshape(r, shape) + np.reshape(d, shape)
    dgamma = (dy * x_hat).sum(axis=red)
    dbeta = dy.sum(axis=red)
    return dx, dgamma, dbeta
