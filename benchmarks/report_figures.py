"""The report's Figs. 4 and 5 from a finished `bench_cifar_report.py` run (Berthier & Mantoux, RecVis
2018 report): the run's `evolution/summary` image (one fixed map per layer, one fixed image, epochs
as columns) and an occlusion map of a dog test image (a 7x7 gray patch at every position, p(dog)
and the predicted label), drawn by the callbacks from the run's last checkpoint.

    DATA_DIR=../shared/datasets python benchmarks/report_figures.py benchmarks/artifacts/report_bf16 --out docs/img
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.utils import save_image

from convlens.callbacks import OcclusionSensitivity
from convlens.checkpoints import load_file, load_state_checked
from convlens.config import CONFIG_MODULE  # noqa: F401  (registers the config resolvers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the run dir of bench_cifar_report.py")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--dog", type=int, default=0, help="which dog of the test split (0: the first)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    summary = a.run / "png" / "evolution" / "summary.png"
    shutil.copyfile(summary, a.out / "cifar_evolution_summary.png")

    cfg = OmegaConf.load(a.run / "config.yaml")
    dm, module = instantiate(cfg.datamodule), instantiate(cfg.model)
    checkpoint = a.run / "checkpoints" / "last.ckpt"
    load_state_checked(module, load_file(checkpoint, "checkpoint")["state_dict"], str(checkpoint))
    module.eval()
    dm.setup("test")
    dog = dm.class_names.index("dog")
    index = (dm.test_set.labels == dog).nonzero().flatten()[a.dog]
    image = dm.normalization(dm.test_set.images[index:index + 1])
    callback = OcclusionSensitivity(probe=(image, torch.tensor([dog])), patch=7, stride=1, target="true",
                                    tile_size=128)
    trainer = SimpleNamespace(datamodule=dm, global_step=0, loggers=[], sanity_checking=False)
    module_ns = SimpleNamespace(net=module.net, device=torch.device("cpu"))
    callback.setup(trainer, module_ns, "fit")
    callback.on_fit_start(trainer, module_ns)
    drawn = {}
    callback.log_image = lambda trainer, tag, img: drawn.__setitem__(tag, img)
    with torch.no_grad():
        callback.visualize(trainer, module_ns)
    save_image(drawn["occlusion/0"], a.out / "cifar_occlusion_dog.png")
    print(f"wrote {a.out / 'cifar_evolution_summary.png'} and {a.out / 'cifar_occlusion_dog.png'} "
          f"(test image #{int(index)})")


if __name__ == "__main__":
    main()
