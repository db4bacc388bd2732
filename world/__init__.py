"""The synthetic world's own models: the tools that measure and teach DreamPortrait there.

The synthetic world (:mod:`dreamportrait.synthetic`) stands in for the paper's data and
pretrained models at a scale one machine can train. Here are its small versions of them:

* the judge's training and evaluation (:mod:`.judge_training`; the network itself is
  :mod:`dreamportrait.synthetic.judge`, part of the world's definition),
* the small CLIP (:mod:`.clip_training`),
* the small latent-diffusion teacher (:mod:`.teacher_training`, samples with
  :mod:`.teacher_sample`, a random tiny one for tests with :mod:`.tiny_teacher`),
* what they share: the world's data sets held in memory (:mod:`.data`) and training-curve
  plots (:mod:`.curves`). Results: ``world/RESULTS.md``.

DreamPortrait's own stages live in ``train/``, which never imports this package.
"""
