"""TensorBoard event files: writing image summaries fast, reading events back, exporting PNGs."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary


def encode_png(pixels: np.ndarray, scale: int = 1, level: int = 1) -> bytes:
    """PNG bytes of an [H, W] (gray) or [H, W, 3] (RGB) uint8 array, enlarged `scale` times
    (nearest neighbour). Every row is stored with PNG's "Up" filter (its difference to the row
    above) and deflated at `level`: the repeated rows of an enlarged image become zero rows, which
    are written as such, without enlarging the image vertically first, and deflate to almost
    nothing. About twice as fast as PIL's level-1 encoder, which picks a filter per row, and
    smaller (benchmarks/RESULTS.md, section 3)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png needs an [H, W] or [H, W, 3] uint8 array, got {pixels.dtype} {pixels.shape}")
    scale = max(1, int(scale))
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1)
    height, width = pixels.shape[0] * scale, pixels.shape[1]
    rows = np.ascontiguousarray(pixels).reshape(pixels.shape[0], -1)
    filtered = np.zeros((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "Up"; a repeated row differs from the one above by zero
    firsts = filtered[::scale, 1:]  # the first copy of each row: its difference to the row before
    firsts[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=firsts[1:])  # modulo 256, as PNG defines it

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    color_type = 0 if pixels.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(filtered.data, level)) + chunk(b"IEND", b""))


def image_summary(tag: str, image: torch.Tensor, scale: int = 1) -> Summary:
    """A TensorBoard image summary of a [1|3, H, W] image in [0, 1], as `SummaryWriter.add_image`
    writes it (values truncated to uint8) but encoded by `encode_png`, several times faster than
    add_image, and enlarged `scale` times (nearest neighbour) while it is encoded."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    channels = pixels.shape[2]
    if channels == 1:
        pixels = pixels[:, :, 0]
    scale = max(1, int(scale))
    encoded = Summary.Image(height=pixels.shape[0] * scale, width=pixels.shape[1] * scale, colorspace=channels,
                            encoded_image_string=encode_png(pixels, scale))
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
