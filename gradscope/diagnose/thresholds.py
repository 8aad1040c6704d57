"""Every threshold the diagnosis uses, in one place, each with its source.

Depth thresholds are *amplitude* ratios (gradient RMS, activation std), so the
same numbers serve the forward and the backward pass.  They are deliberately
wide: the rules are tried on models nobody here has seen, and a false alarm on
a healthy ResNet or Transformer costs the user more trust than a late warning.
"""

from __future__ import annotations

# -- depth: how far the signal may drift between the two ends of the network
#    (backward: the parametrised layer next to the loss vs the one next to the
#    input; forward: the first non-embedding parametrised layer vs the last) --
# The course: a per-layer gain of 0.8 compounds to 0.8^100 ≈ 2e-10 (vanishing),
# 1.5 to 1.5^100 ≈ 4e17 (exploding).  Two decades is what 20 layers at gain 0.8
# (0.8^20 ≈ 1.2e-2) or 11 layers at 1.5 (1.5^11 ≈ 86) do: the first layers then
# learn a hundred times slower (faster) than the last ones.
DEPTH_WARN_LOW = 1e-2
DEPTH_WARN_HIGH = 1e2
# Four decades (0.8^41 ≈ 1e-4, 1.5^23 ≈ 1e4).  He et al. 2015 (Fig. 3): a
# 30-layer plain ReLU net with Xavier init, whose ∂ℓ/∂h shrinks by √2 per layer
# (2^-14.5 ≈ 4e-5 over 29 layers), does not train at all.
DEPTH_ERROR_LOW = 1e-4
DEPTH_ERROR_HIGH = 1e4
# A plain stack (no normalisation layer) with at least this many parametrised
# layers also gets the normalisation/residual advice: He et al. 2015 train a
# 22-layer plain ReLU net with either init but a 30-layer one only with theirs,
# and He et al. 2016 (ResNet) show plain stacks degrading beyond ~20 layers.
PLAIN_DEEP_LAYERS = 20

# -- through time: the per-step factor, judged over the lengths a model trains on ----
# Backprop through time compounds one factor per step (Pascanu et al. 2013, eq. 5-7):
# a per-step gradient growth above 1 explodes and below 1 vanishes *for long enough
# sequences*, whatever length the audit happened to feed.  The verdict compounds the
# measured per-step factor over the longer of the audited length and this horizon,
# then applies the depth decades (DEPTH_*): 100^(1/49) ≈ 1.10 per step warns,
# 1e4^(1/49) ≈ 1.21 is an error (and 0.91 / 0.83 going down).  50 steps is the
# shorter of two common training windows: char-rnn's default seq_length of 50 and
# AWD-LSTM's BPTT length of 70 (Merity et al. 2018).
THROUGH_TIME_HORIZON = 50
# The factor judged is the end of its 95% confidence interval nearest to 1
# (timeprofile.backward_factor_bounds), so a handful of noisy bins from a short
# sequence (a per-step loss makes ∂ℓ/∂x_t nearly flat: measured 1.09-1.11 over
# 5 steps on default-init nn.RNN language models) is not extrapolated into a verdict.

# -- absolute range of gradient values ---------------------------------------
# The course: a healthy range for gradient values is roughly [1e-6, 1e3].
GRADIENT_RMS_MIN = 1e-6
GRADIENT_RMS_MAX = 1e3
# The floor fires only together with decay across depth: the width-corrected
# ratio to the loss end a decade or more down.  A uniformly small gradient (a
# loss multiplied by 1e-12) has no decay; a 1-5x spread is width, not depth.
FLOOR_NEEDS_DECAY = 0.1

# A layer's weight gradient this many times below both of its closest learning
# neighbours' (in execution order) is a structural zero: the loss does not depend on
# the layer's output, and what is left is rounding.  fp32's unit roundoff is
# 2^-24 ≈ 6e-8, so a difference of equal O(g) terms (a top-1 router's weight
# p / Σp = 1) comes out at a few ulps of g: Mixtral's top-1 router measures
# 4e-8 of its neighbours.  A real gradient changes between neighbours by one
# layer's gain, at most a decade or two (the steepest the depth rules see, a
# small-weight sigmoid stack, loses 0.028 per layer): a million is four
# decades beyond.  Layer-scaled branches (gain 1e-6 at init) are left out.
STRUCTURAL_ZERO_RATIO = 1e-6

# -- init analysis ------------------------------------------------------------
# Activation factor E[act(y)^2] / E[y^2] for y ~ N(0, s^2): ReLU keeps half of
# the second moment (He et al. 2015, eq. 7: Var[y_l] = n_l Var[w_l] E[x_l^2],
# E[x_l^2] = Var[y_{l-1}] / 2).
RELU_FACTOR = 0.5
# The course's per-layer gains: 0.8 vanishes (0.8^100 ≈ 2e-10) and 1.5 explodes
# (1.5^100 ≈ 4e17).  A predicted variance gain outside [0.8, 1.5] is "far from 1":
# Xavier under ReLU (1/2, He et al. 2015) and PyTorch's default under ReLU (1/6)
# both are; Kaiming (1) is not.
INIT_GAIN_LOW = 0.8
INIT_GAIN_HIGH = 1.5
# The compounded gain of a stack (the product of the per-layer variance gains of
# the layers that multiply) is healthy within one decade of amplitude, two of
# variance.  Glorot & Bengio 2010's "standard" init U[-1/sqrt(n), 1/sqrt(n)]
# (n·Var = 1/3) on their 5-layer tanh net compounds to ~0.006 over the hidden
# layers and trains 3x worse; PyTorch's default init on a 3-layer ReLU MLP
# (1/6 per layer over 2 hidden layers, 0.028) trains fine.
INIT_STACK_LOW = 1e-2
INIT_STACK_HIGH = 1e2
# Two parametrised layers are chained (the second receives what the first put
# out) when those second moments agree within this factor: exact for Linear ->
# ReLU -> Linear, within sampling for Dropout in between; a residual add or a
# parallel projection (query/key/value) differs by far more.
CHAIN_TOLERANCE = 1.3
# Weight std within 25% of the recommended std counts as "already right"
# (kaiming_uniform_ and kaiming_normal_ give the same std; PyTorch's default
# init, kaiming_uniform_(a=√5), is 1/√6 ≈ 0.41 of He's and is not "right").
INIT_STD_TOLERANCE = 1.25

# -- precision ----------------------------------------------------------------
# Format limits come from torch.finfo via gradscope.formats.get_format.
# Less than one binade of headroom (absmax > max / 2): one doubling (a Dropout
# of p=0.5 in training mode, a larger batch, one more step of growth) overflows.
# HF's debugging guide shows an fp16 activation at 6.27e4 (headroom 0.06 binade)
# turning inf after Dropout(p=0.1).
HEADROOM_WARN_BINADES = 1.0
# A gradient tensor is "mostly flushed" when at least half of its finite
# non-zero values lie two or more binades below the format's smallest subnormal
# (values in the binade just below round up to the smallest subnormal).
UNDERFLOW_WARN_FRAC = 0.5
# The recommended loss scale keeps one binade of headroom below the format's
# maximum, because the next batch's largest gradient can be twice this one's.
LOSS_SCALE_HEADROOM_BINADES = 1
# torch.amp.GradScaler's default init_scale (PyTorch documentation).
GRADSCALER_DEFAULT_EXPONENT = 16

# -- dead units ---------------------------------------------------------------
# A healthy ReLU on a symmetric pre-activation outputs zero about half the time
# (He et al. 2015).  At 95% zeros most units never fire; at 99.9% the layer
# passes essentially no signal and no gradient: the layers below stop learning.
DEAD_WARN_ZERO_FRAC = 0.95
DEAD_ERROR_ZERO_FRAC = 0.999
# Those two judge a layer only when its per-unit liveness was not recorded (a
# record from an older version, a compiled region).  Per unit (gradscope.liveness):
# a unit is dead when its output stayed <= 0 for every sample and position seen.
# A healthy unit with a symmetric pre-activation is <= 0 on n independent samples
# with probability 2^-n (He et al. 2015's zero-mean pre-activations); from 16
# samples on that is 1.5e-5, under one unit in expectation for layers of up to
# 65k units, so fewer samples are not judged per unit.
DEAD_UNITS_MIN_POSITIONS = 16
# After a BatchNorm in training mode each channel is centred over the batch
# (Ioffe & Szegedy 2015), so a healthy channel fires on about half the outputs
# and none is dead; a few dead units are common in trained ReLU networks and cost
# little capacity (Lu et al. 2019, "Dying ReLU and Initialization", study the
# layer that dies whole), a quarter of a layer lost cuts its width by that much.
DEAD_UNITS_WARN_FRAC = 0.25
# Without such centring the samples' pre-activations share a component: ReLU
# outputs have a positive mean m, so unit c sees w_c . m + noise, and at depth
# the samples grow correlated (the inputs' correlation tends to 1 through ReLU
# layers: Poole et al. 2016, Hayou et al. 2019).  Units whose w_c . m < 0 then
# stay off for the whole batch: measured 30-40% of the units of the deep layers
# of a healthy 30-layer Kaiming MLP (He et al. 2015 train it), never beyond
# half, since with symmetric weights w_c . m < 0 for half the units in
# expectation.  More than half, by more than 3 binomial standard deviations
# (0.5 + 1.5/sqrt(units)), needs a negative shift.
DEAD_UNITS_WARN_FRAC_UNCENTRED = 0.5
DEAD_UNITS_MARGIN_SIGMAS = 3.0
# Every unit dead: the layer passes no signal and no gradient reaches anything below it.
DEAD_UNITS_ERROR_FRAC = 1.0
# The cause is named the shift (a Linear/Conv bias, a BatchNorm beta) when the
# dead units' median shift sits this many pre-activation standard deviations
# below 0: a Gaussian pre-activation 3 std below 0 fires on 0.13% of samples, so
# the shift alone keeps the unit off; above that, the weights and inputs share the blame.
DEAD_CAUSE_SHIFT_STDS = 3.0

# -- saturated units ----------------------------------------------------------
# A tanh unit with |y| >= 0.9 has derivative 1 - y^2 <= 0.19; a sigmoid unit
# with |2y - 1| >= 0.9 has derivative y(1 - y) <= 0.0475 (a fifth of its 0.25
# maximum).  Glorot & Bengio 2010 (Sec. 3) show such saturated layers stall
# training.  From the second moment alone, P(|u| >= t) >= (E[u^2] - t^2)/(1 - t^2)
# for |u| <= 1: we flag when that lower bound on the saturated fraction is high.
SATURATION_LEVEL = 0.9
# Counted exactly from the pre-activation's binade histogram: tanh is saturated
# for |y| >= 2 (binades >= 1; derivative 1 - tanh(2)^2 = 0.071), sigmoid for
# |x| >= 4 (binades >= 2; derivative 0.018 = 0.071 x its 0.25 maximum, since
# sigmoid(x) = (1 + tanh(x/2))/2): both below a fourteenth of their maximum.
SATURATION_BINADE_TANH = 1
SATURATION_BINADE_SIGMOID = 2
SATURATED_WARN_FRAC = 0.5
SATURATED_ERROR_FRAC = 0.9

# -- clipping -------------------------------------------------------------------
# AutoClip (Seetharaman et al. 2020): clip the global norm at the 10th
# percentile of all past gradient norms, once there is a history (they use the
# whole run; 20 norms is the least we accept for a percentile).
AUTOCLIP_PERCENTILE = 10.0
AUTOCLIP_MIN_HISTORY = 20
# With fewer observed norms there is no distribution to take a percentile of:
# clip at twice the observed (median) norm, so ordinary steps pass untouched and
# only spikes of more than one binade are cut.  A heuristic, said as such.
CLIP_FEW_NORMS_FACTOR = 2.0

# -- mixture-of-experts routing (gradscope.diagnose.experts) -------------------
# An expert is starved when it receives at most 5% of its fair share of the
# token choices (tokens · top_k / E).  Measured (a sweep during development;
# tests/test_experts.py re-checks E = 4, 8): a randomly initialised router over 512 random tokens
# (Mixtral, OLMoE, Qwen2-MoE from configs; E = 4, 8, 16, top-2; 8 seeds each)
# gives its least-used expert 0.28-0.75 of the fair share (median 0.48-0.88):
# more than five times this threshold.
EXPERT_STARVED_SHARE = 0.05
# With fewer than 32 token choices per expert expected, a (nearly) empty expert
# can be chance: the least-used expert of a healthy router expects ~0.28 of its
# share, 9 tokens at 32, and P(Poisson(9) <= 1) ≈ 1e-3.  Below it, routing is
# reported as not assessed.
EXPERT_MIN_FAIR_TOKENS = 32

# -- the model's input ----------------------------------------------------------
# Init conventions assume standardised inputs (LeCun et al. 1998, "Efficient
# BackProp", sec. 4.3: zero mean, unit variance).  One decade of RMS either side
# keeps the usual encodings healthy (pixels in [0, 1]: RMS ~0.5; standardised
# features: 1; token embeddings are not model inputs here) while an input of RMS
# 1e-3 lets PyTorch's default biases (RMS 1/sqrt(3 fan_in), 0.07 at fan_in 64)
# outweigh the weighted signal, and one of RMS 1e3 (raw [0, 255] pixels are
# ~120) scales a ReLU network's logits by as much.
INPUT_RMS_LOW = 0.1
INPUT_RMS_HIGH = 10.0

# -- pre-norm residual stream ---------------------------------------------------
# The stream entering the first block against the median RMS a block writes
# (gradscope.diagnose.stream).  At their default init, GPT-NeoX measures 1.1, T5
# 1.5, BERT 2.0, Llama and Mistral 2.9 (4 layers, width 64), the test suite's
# ViT (patch embeddings with the class token) 21; a Llama embedding at
# std 1 measures 142, at std 100 1.4e4.  Above two decades the blocks are under
# 1% of the stream and their gradients 100x smaller: the depth band's two decades.
STREAM_RATIO_HIGH = 1e2
