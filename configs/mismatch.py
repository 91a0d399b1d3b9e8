r"""Gradient-mismatch analysis (BinaryDuo, section 2 of the method) on small networks.

Launch (about 5-10 minutes on 2 CPU cores, depending on their load):

    python -m duo_jax.mismatch --config=configs/mismatch.py --workdir=runs/mismatch

Writes ``runs/mismatch/mismatch.json`` (every cell: mean, std and per-seed
values; the config; a per-layer check of the paper's finding) and
``runs/mismatch/mismatch.png`` (similarity per layer, one series per
activation, error bars over seeds), and prints the tables.

What it does: a 3-hidden-layer MLP on MNIST-5k and a 3-conv CNN on the 8x8
digits are each trained for ``train_steps`` Adam steps in every activation
mode (float ReLU as the sanity check; binary with each backward surrogate;
ternary; 2-bit), then frozen (BatchNorm in inference mode) and, per layer
kernel, the STE gradient on one fixed batch of ``measure_batch`` training
examples is compared by cosine similarity with the coordinate discrete
gradient (CDG) and with the Gaussian-smoothed gradient, on the same
``num_coords`` random coordinates.

Constants, and why:
- ``eps_rel = sigma_rel = 0.1``: steps are in units of each layer's
  pre-activation spread (``mismatch_analysis.probe_scales``): one CDG step
  moves a unit's pre-activation by about 0.1 of its standard deviation. It is
  the largest value of a sweep (0.05 / 0.1 / 0.2 / 0.4, 3 seeds, both nets)
  at which the float sanity CDG stays >= 0.95 in every layer (0.05: >= 0.98;
  0.2: the first layers drop to 0.90 (MLP) and 0.60 (CNN), secants rather than
  tangents). Smaller steps leave few threshold crossings in the batch, so
  the quantized nets' CDG gets noisier (MLP at 0.05: 5-10 % of the CDG
  entries of the binary hidden layers are exactly zero).
- ``num_coords = 128`` per layer (all of a smaller layer), the same
  coordinates for both estimators; a cosine on n coordinates has a noise of
  order 1/sqrt(n).
- ``num_samples = 128`` antithetic pairs: on d = 128 coordinates the smoothed
  estimate of even an exact gradient has cosine about 1/sqrt(1 + d/K) = 0.7,
  so read the smoothed rows against the float row (their ceiling).
- 3 seeds (initialization, data order, coordinate subset, samples).
- ``train_steps = 300`` (about 10 epochs of MNIST-5k at batch 128): the nets
  are well past initialization (test accuracy: MLP 0.87-0.94, CNN 0.89-0.98).
- ``measure_batch = 256`` training examples, one fixed batch for everything.

What it produced (Nov 2026, 2 shared CPU cores, 4.4 minutes): float sanity CDG
0.95-1.00 in every layer; hidden-layer STE-vs-CDG cosines (3-seed means),
MLP dense1/2/3: clipped 0.13/0.31/0.71, identity 0.17/0.32/0.41, approx_sign
0.34/0.55/0.90, swish_sign 0.27/0.61/0.88, tanh 0.34/0.56/0.89, ternary
0.36/0.46/0.83, 2-bit 0.24/0.54/0.93; CNN conv1/2/3: clipped 0.22/0.34/0.61,
identity 0.11/0.08/0.29, approx_sign 0.02/0.41/0.87, swish_sign
0.07/0.47/0.90, tanh 0.01/0.51/0.91, ternary 0.48/0.51/0.88, 2-bit
0.39/0.64/0.91. Ternary beats binary with the same clipped STE in 12 of 12
hidden (net, estimator, layer) cells, by 0.06-0.27, but beats every binary
surrogate by more than the surrogates' spread in only 1 of 12: the smooth
surrogates (approx_sign, tanh, swish_sign) reach ternary's similarity in most
layers and the surrogate choice moves binary by 0.2-0.6. The paper's finding
is reproduced only against the clipped STE.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The default analysis: MLP on MNIST-5k and CNN on 8x8 digits, 8 activations, 3 seeds."""
    c = ml_collections.ConfigDict()
    # What to measure: 'net:dataset' pairs; nets 'mlp' | 'cnn', datasets 'mnist5k' | 'digits'.
    c.nets = ("mlp:mnist5k", "cnn:digits")
    c.mlp_widths = (128, 128, 128)
    c.cnn_features = (8, 16, 16)  # 3x3 convs; 2x2 max-pool after the first
    # 'float' (ReLU), binary with a surrogate ('clipped', 'identity', 'approx_sign',
    # 'swish_sign', 'tanh'), 'ternary', 'uniform2' (2-bit, 4 levels).
    c.activations = ("float", "clipped", "identity", "approx_sign", "swish_sign", "tanh", "ternary", "uniform2")
    c.swish_beta = 5.0
    c.tanh_beta = 2.0
    c.seeds = (0, 1, 2)
    # Brief training, in each activation's own mode.
    c.train_steps = 300
    c.batch_size = 128
    c.learning_rate = 1e-3
    # The measurement.
    c.measure_batch = 256
    c.num_coords = 128
    c.eps_rel = 0.1
    c.sigma_rel = 0.1
    c.num_samples = 128
    c.chunk_size = 32
    return c
