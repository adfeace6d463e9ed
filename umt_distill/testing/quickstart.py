"""A miniature quickstart: overrides that run every step of ``umt-distill quickstart`` in seconds (tests)."""

MINI: list[str] = [
    "quickstart.world.clips=30", "quickstart.world.num_frames=8",
    "quickstart.clip.steps=3", "quickstart.clip.batch_size=16", "quickstart.clip_images=48", "quickstart.clip_eval_images=16",
    "views.num_frames=4", "cache.num_views=1", "train.epochs=1", "train.batch_size=4", "train.log_every=1",
    "quickstart.finetune.steps=2", "quickstart.finetune.test_clips=1", "quickstart.finetune.workers=0",
    "quickstart.stage2_epochs=1", "quickstart.finetune.parallel=1",  # one run with parallel=2 below
    "quickstart.qa.steps=2",
]
