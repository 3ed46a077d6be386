"""Keras layers for HipAtlas (ProST, inv-ProST, warps). Importing this registers them."""
