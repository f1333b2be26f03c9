"""Lowering a bundle to device runtimes, kept split: one program per backbone piece and one per
(layer, expert), so a device loads and drops experts one by one. See docs/LOWERING.md."""
