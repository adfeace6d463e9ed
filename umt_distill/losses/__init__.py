"""The training losses, each beside its plain-loop ``*_reference`` that a parity test holds it to.

- :mod:`~umt_distill.losses.uta` — unmasked token alignment (stage 1, stage 2, UTA + pixel).
- :mod:`~umt_distill.losses.pixel` — pixel reconstruction and its per-patch targets (VideoMAE).
- :mod:`~umt_distill.losses.vl` — vision-text contrast (VTC), matching (VTM) and masked language
  modelling (MLM) of stage 2 and retrieval fine-tuning.

Losses are the ground layer: they never communicate across ranks themselves. A loss over the global
batch (VTC) takes the gather as an argument, and the loop passes
:func:`umt_distill.training.distributed.gather_with_grad`.
"""
