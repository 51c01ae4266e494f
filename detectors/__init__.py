"""Keyframe feature maps + person boxes -> actions (AVA-style actor-context relation heads)."""
