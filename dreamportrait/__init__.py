"""DreamPortrait: text-guided 3D-aware portrait generation in one forward pass."""
