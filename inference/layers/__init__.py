"""Keras layers for HipAtlas, one concept per module; importing a module registers its layers.

``prost`` (ProST, inv-ProST), ``warp`` (spatial transformer, scaling and squaring, affine fields),
``sampling`` (trilinear / nearest sampling under them), ``atlas`` (the atlas as weights, label
masks), ``normalise`` (scale normalisation of the 2D inputs), ``grid`` (changes of grid) and
``plumbing`` (view selection, depth copies, stop-gradient, recomputed blocks). Every layer is
registered under the package ``hipatlas``: the name a ``.keras`` file records is
``hipatlas>ClassName``, independent of the module, so the shipped models load with
``safe_mode=True`` wherever a layer lives.
"""
