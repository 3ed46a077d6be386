"""Widgets of the workstation: radiographs with masks and overlays, the 3D view, slice views."""
