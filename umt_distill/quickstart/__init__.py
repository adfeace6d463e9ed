"""``umt-distill quickstart``: the whole UMT loop at toy scale on a CPU, offline, in minutes.

One module per step; ``run.py`` holds the run order and nothing else:

1. **World** — toy MP4 clips of patterned discs that move or change size (``world.py``):
   appearance is visible in any frame, motion only across frames.
2. **Teacher** (``teacher.py``, ``tiny_clip.py``) — a tiny open_clip image CLIP trained on still images with
   appearance-only captions: like a web CLIP, it knows what things look like, not how they move.
3. **Cache** (``cache.py``) — ``cache-teacher`` over K augmented views of every training clip (skipped
   with ``teacher.mode=online``, where the teacher runs at every training step instead).
4. **Distil** (``stage1.py``) — stage 1: the tiny video student aligns its unmasked tokens with the
   teacher's, under semantic masks.
5. **Evaluate** (``probes.py``) — linear and kNN probes on frozen features for appearance and motion:
   the teacher (frame-averaged embedding), the distilled student, and the same student with its
   initial random weights (the control).
6. **Fine-tune** (``finetune.py``) — the distilled student, the control and the image teacher (its
   tower per frame) fine-tuned on the motion labels with one recipe, then tested.
7. **Stage 2** (``stage2.py``, ``zero_shot.py``) — video-text pretraining on the training captions
   (which name appearance and motion) from the stage-1 student, then zero-shot retrieval on the test
   split against the teacher's own image-text model, frame-averaged (``recipes/quickstart/stage2.yaml``).
8. **Report** (``results_report.py``, ``plots.py``) — tables in the terminal, ``report.md``, ``results.json``
   and PNG plots.

Shared by the steps: ``settings.py`` (the ``quickstart.*`` keys), ``reuse.py`` (reuse of finished runs),
``names.py`` (the models' names), ``pool.py`` (steps 6 and 7 side by side: the fine-tuning runs and
stage 2, one process each, ``quickstart.finetune.parallel`` at a time). Imports go one way: ``run`` →
steps → ``reuse``/``settings``/``names``; ``results_report`` → ``plots`` and the steps' constants; no
step imports ``run`` or ``results_report``.

Every step that finished before is reused on a re-run, and the output says so. Settings: the recipe
``recipes/quickstart/stage1.yaml`` (any ``key=value`` override) plus the quickstart's own
``quickstart.world.*``, ``quickstart.clip.*``, ``quickstart.finetune.*`` and ``quickstart.*`` keys
(:class:`~umt_distill.quickstart.settings.QuickstartSettings`; ``quickstart.stage2_epochs`` for stage 2).
"""

from umt_distill.quickstart.run import run_quickstart
from umt_distill.quickstart.settings import QuickstartSettings, parse_settings

__all__ = ["run_quickstart", "parse_settings", "QuickstartSettings"]
