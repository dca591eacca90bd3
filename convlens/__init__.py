"""convlens: watch, live in TensorBoard, what a CNN's filters learn.

- `convlens.callbacks`: Lightning callbacks that draw each method every epoch, on any model;
- `convlens.viz`: the methods themselves, pure functions over tensors;
- `convlens.models`, `convlens.datamodules`: the nets and data of the papers;
- `convlens-train`, `convlens-visualize`, `convlens-sweep-summary`: the command lines
  (Hydra configs packaged as `convlens.conf`).
"""
__version__ = "0.2.0"
