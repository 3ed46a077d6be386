"""``hipatlas export-onnx``: the registration network as an ONNX model for ONNX Runtime.

How: the Keras model is traced once as a ``tf.function`` with static input shapes (batch 1, the
model's detector and grid) under :func:`inference.layers.sampling.portable_ops`, where ProST,
inv-ProST, the warps and scaling and squaring run as plain gathers and arithmetic (their XLA
kernels, custom gradients and chunk loops are training and speed devices of TensorFlow), and
3 x 3 inverses are written out by the adjugate (ONNX has no matrix inverse). ``tf2onnx``
converts that graph; nothing of the network is left out or approximated: convolutions, batch
norm, leaky ReLU, dense, pooling, upsampling, ProST (line integrals and beam samples), the
affine field, inv-ProST, scaling and squaring (``int_steps`` compositions), the upsampled
field, the composition with the affine map and the (nearest-neighbour) label warp.

Keras's own ``model.export(format="onnx")`` goes through the same tf2onnx but traces the layers
with their XLA kernels: the file it writes keeps 17 ``PartitionedCall`` nodes, which ONNX Runtime
refuses as an invalid graph (measured with Keras 3.15, tf2onnx 1.17).

The ONNX model computes only what registration uses (:data:`inference.backends.OUTPUT_NAMES`).
Its file, sha256, opset, input shapes and the source model's sha256 are recorded in the model
card (key ``onnx``) beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time
from typing import Any

from inference.backends import ONNX_CARD_KEY, OUTPUT_NAMES
from inference.errors import ConfigError, ModelError
from inference.io import atomic_file
from inference.model_config import (NUM_VIEWS, card_path_for, read_model_card, update_model_card,
                                    write_card_file)
from inference.checksums import sha256_file
from inference.validate import whole_number

log = logging.getLogger(__name__)

#: ONNX opset of the export (ONNX Runtime >= 1.12 runs it).
DEFAULT_OPSET = 17


def input_shapes(config) -> dict[str, list[int]]:
    """Static input shapes of the exported model (batch of one)."""
    height, width = config.detector_hw
    return {"images": [1, NUM_VIEWS, height, width], "masks": [1, NUM_VIEWS, height, width],
            "projection": [1, NUM_VIEWS, 3, 4], "index_to_world": [1, 4, 4]}


def export_onnx(model_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                opset: int = DEFAULT_OPSET, gridsample: bool = True) -> dict[str, Any]:
    """Export a ``.keras`` registration model to ONNX and record it in the model card.

    Parameters
    ----------
    model_path : the ``.keras`` file (verified against its model card)
    out_path : the ``.onnx`` file; default: beside the model, same name
    opset : ONNX opset of the conversion
    gridsample : rewrite the trilinear samplers as ``GridSample`` nodes
        (:mod:`inference.onnx_samplers`; the model's opset becomes 20)

    Returns
    -------
    dict : the model card's ``onnx`` entry (file, sha256, source_sha256, opset, shapes, ...).
        When ``out_path`` lies in the model's folder, the model's card gets the entry; elsewhere
        a copy of the card with the entry is written beside the ``.onnx``.
    """
    import tensorflow as tf

    try:
        import onnx
        import tf2onnx
    except ImportError as error:
        raise ModelError(f"exporting to ONNX needs the packages of the export extra ({error.name} is "
                         "missing): pip install 'hipatlas[export]'") from None

    from inference import model as model_lib
    from inference.layers.sampling import portable_ops
    from inference.onnx_samplers import GRIDSAMPLE_OPSET, SAMPLERS_GRIDSAMPLE, rewrite_samplers

    model_path = pathlib.Path(model_path)
    out_path = pathlib.Path(out_path) if out_path is not None else model_path.with_suffix(".onnx")
    if out_path.suffix != ".onnx":
        raise ConfigError(f"the ONNX model file must end in .onnx, not {out_path.name!r}")
    opset = whole_number(opset, "opset", 13, 21)
    card_file = card_path_for(model_path)
    card = read_model_card(card_file)
    net = model_lib.load_model(model_path, card)
    config = model_lib.model_config_of(net)
    shapes = input_shapes(config)
    spec = [tf.TensorSpec(shape, tf.float32, name=name) for name, shape in shapes.items()]

    def forward(images, masks, projection, index_to_world):
        outputs = net({"images": images, "masks": masks, "projection": projection,
                       "index_to_world": index_to_world}, training=False)
        return {key: outputs[key] for key in OUTPUT_NAMES}

    function = tf.function(forward, input_signature=spec, autograph=False)
    started = time.perf_counter()
    samplers = 0
    with atomic_file(out_path, ".onnx") as tmp:
        with portable_ops():
            proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
        if gridsample:
            proto, samplers = rewrite_samplers(proto)
        proto.producer_name = "hipatlas export-onnx (tf2onnx)"
        proto.doc_string = (f"HipAtlas registration network {card.get('name')} exported from "
                            f"{model_path.name} (sha256 {card['sha256']})")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if sorted(inputs) != sorted(shapes) or sorted(outputs) != sorted(OUTPUT_NAMES):
        raise ModelError(f"the exported graph has inputs {inputs} and outputs {outputs}, expected "
                         f"{sorted(shapes)} and {sorted(OUTPUT_NAMES)}")
    entry = {
        "file": out_path.name,
        "sha256": sha256_file(out_path),
        "bytes": out_path.stat().st_size,
        "source_model_file": model_path.name,
        "source_sha256": card["sha256"],
        "opset": GRIDSAMPLE_OPSET if gridsample and samplers else opset,
        "samplers": SAMPLERS_GRIDSAMPLE if gridsample and samplers else "gathers",
        "gridsample_count": samplers,
        "inputs": shapes,
        "outputs": list(OUTPUT_NAMES),
        "exporter": f"tf2onnx {tf2onnx.__version__}, tensorflow {tf.__version__}, onnx {onnx.__version__}",
        "export_s": round(time.perf_counter() - started, 1),
    }
    target_card = card_path_for(out_path)
    if target_card.is_file():
        update_model_card(target_card, {ONNX_CARD_KEY: entry})
    else:  # an export into another folder starts from the source model's card
        write_card_file(target_card, {**card, ONNX_CARD_KEY: entry})
    log.info("exported %s -> %s (%.1f MB, opset %d) in %.0f s", model_path.name, out_path,
             entry["bytes"] / 1e6, opset, entry["export_s"])
    return entry


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "export-onnx", help="export a .keras model to ONNX for the ONNX Runtime backend",
        description="Export the whole registration network (static shapes of the model's grid and "
        "detector, batch 1) to an ONNX model and record its sha256, opset and the source model's "
        "sha256 in the model card. Needs TensorFlow and tf2onnx (the export extra).")
    command.add_argument("model", help="the .keras model file")
    command.add_argument("--out", help="the .onnx file (default: beside the model, same name)")
    command.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                         help=f"ONNX opset (default {DEFAULT_OPSET})")
    command.add_argument("--gather-samplers", action="store_true",
                         help="keep the trilinear samplers as gathers and arithmetic (no GridSample, "
                         "the conversion's opset; for runtimes without 5-D GridSample)")
    command.add_argument("--rewrite-only", action="store_true",
                         help="MODEL is an exported .onnx with gather samplers: rewrite them as "
                         "GridSample in place and update its model card (no TensorFlow)")
    command.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.rewrite_only:
        from inference.onnx_samplers import rewrite_onnx_file

        print(json.dumps(rewrite_onnx_file(args.model), indent=2))
        return 0
    entry = export_onnx(args.model, args.out, opset=args.opset, gridsample=not args.gather_samplers)
    print(json.dumps(entry, indent=2))
    return 0
