"""Training-only code for DreamPortrait: losses, teacher, data, stages and evaluation (not imported by the app)."""
