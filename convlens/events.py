"""TensorBoard event files: writing image summaries fast, reading events back, exporting PNGs."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary


def image_summary(tag: str, image: torch.Tensor, scale: int = 1) -> Summary:
    """A TensorBoard image summary of a [1|3, H, W] image in [0, 1], as `SummaryWriter.add_image`
    writes it (values truncated to uint8) but PNG-compressed at level 1, which encodes several
    times faster than add_image's default level 6 for slightly larger files (benchmarks/RESULTS.md).
    `scale` enlarges it by that integer factor (nearest neighbour), on the uint8 pixels: cheaper
    than enlarging the float image first, and the same pixels."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    channels = pixels.shape[2]
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    encoded = Summary.Image(height=picture.height, width=picture.width, colorspace=channels,
                            encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


def _accumulators(logdir: str | os.PathLike):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        yield acc


def read_events(logdir: str | os.PathLike) -> dict[str, dict[str, list[int]]]:
    """{"images": {tag: [steps]}, "scalars": {tag: [steps]}} of every event file under `logdir`."""
    out: dict[str, dict[str, list[int]]] = {"images": {}, "scalars": {}}
    for acc in _accumulators(logdir):
        for tag in acc.Tags()["images"]:
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in acc.Tags()["scalars"]:
            out["scalars"].setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return out


def read_images(logdir: str | os.PathLike) -> dict[str, list[tuple[int, bytes]]]:
    """{tag: [(step, PNG bytes)]} of every image under `logdir`, in file and step order."""
    out: dict[str, list[tuple[int, bytes]]] = {}
    for acc in _accumulators(logdir):
        for tag in acc.Tags()["images"]:
            out.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in acc.Images(tag))
    return out


def export_pngs(event_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Every image in the event files under `event_dir`, latest step per tag, as `<out_dir>/<tag>.png`."""
    written = []
    for tag, entries in read_images(event_dir).items():
        path = Path(out_dir) / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entries[-1][1])
        written.append(path)
    return written
