"""
The meta-learner, Bernoulli gating and the meta buffer.

Concern (SPEC sections 3, 4 and 5); written in the meta.py issue:
- the meta-learner h_phi: score -> weight in (0, 1), Linear(1->100) -> tanh -> Linear(100->1) ->
  sigmoid, every weight 0.1 and bias 0 at initialisation (h(l) = sigmoid(10 tanh(0.1 l)));
- the gating loop of Algorithm 1 lines 7-12 (w = h(l_off), u ~ U(0,1), generate when u > w) and
  its ablations (random, threshold, all), the loss weightings (meta, uniform, fixed);
- the meta buffer of detached (l_off, l_on) and the meta-learner update (Eq. 6) every T_meta
  policy steps, replicated and kept identical across ranks.

Run (once that issue lands)
    python meta.py              # self-check: learns h on a synthetic buffer, prints the curve
"""
