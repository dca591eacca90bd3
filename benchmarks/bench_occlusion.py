"""Speed and memory of occlusion sensitivity (viz/occlusion.py): incremental inference against the
batched full forward and captum's Occlusion. Prints markdown tables and writes them as JSON.

    python benchmarks/bench_occlusion.py [--nets vgg16,cifar,lenet] [--repeats 2] [--vgg-repeats 1]
        [--taus 0.5,0.8] [--json benchmarks/occlusion.json] [--quick]

Nets (random weights, eval mode, random inputs, fill 0, targets = the unoccluded predictions):
* vgg16: convlens VGG16(weights=None), 4 images 3x224x224, patch 25, stride 8 (25 x 25 = 625
  positions per image, 2,500 occluded copies);
* cifar: CifarConvNet(256, 64), 16 images 3x32x32, patch 7, stride 1 (676 positions, 10,816 copies);
* lenet: LeNet, 16 images 1x28x28, patch 7, stride 1 (484 positions, 7,744 copies).
Every variant uses occlusion_maps' default batch, default_max_batch(C, H, W) copies per chunk
(27 at 224x224, 1024 at 32x32 and 28x28), so the memory figures compare at the same batch.

Cases, run --repeats times interleaved (VGG16: --vgg-repeats), best time reported:
* batched: occlusion_maps(incremental=False), one full forward per copy;
* incremental, automatic: occlusion_maps() as the callback calls it (it may fall back to batched;
  the table says which path it took and where it switched to the full forward);
* incremental, forced: incremental=True (as far as the chain goes, until a window covers its map),
  when its plan differs from the automatic one;
* captum.attr.Occlusion (sliding window C x patch x patch, strides C x stride x stride, the same
  fill, forward = softmax of the logits), with the perturbations_per_eval (half, once or twice
  our batch divided by the image count; captum evaluates that many positions of every image per
  forward pass) that was fastest on a probe run over a subset of positions;
* tau: occlusion_maps(tau=...), Krypton's projective-field thresholding, with its error against
  the exact maps: max and mean |p - p_exact|, the max relative to each image's range of p_exact,
  the fraction of positions with the same predicted label, and of images whose map minimum (the
  position that hides the most) is the same position.

--approximate (issue #23, written to occlusion_approximate.json through results_json): Krypton's
adaptive drill-down (`approximate="fast"` and a more aggressive setting) against the exact
incremental path, the batched full forward and captum's Occlusion, with the quality of each map
against the exact one (SSIM over the data range 1, the heat map's fixed scale, and over each exact
map's own range; max |p - p_exact|; top-1 label agreement) and reuse across two training epochs:
* cifar: CifarConvNet(256, 64) trained here, seeded, on 10,000 CIFAR-10 training images from
  $DATA_DIR/cifar10-jpg (2 epochs of Adam, lr 1e-3; random weights when the data is missing), 16
  test images, patch 7, stride 1, the gray patch, the true labels; reuse: the maps of epoch 1
  reused at epoch 2, and those of epoch 2 at a third epoch at lr 1e-5 (late training);
* vgg16: random weights (no trained VGG16 weights on this offline machine), 4 random images
  3x224x224, patch 25, strides 8 and 4. The batched forward and captum cost the same per copy
  whatever the positions, so they are timed on one image at stride 25 (64 copies) and scaled to
  the copies of each case; the exact and approximate paths run in full.

Memory: each variant runs again in a fresh Python subprocess, over a subset of positions (at least
three chunks of the same batch), and reports the rise of its peak resident set size over the
resident set after building the model and images (the peak, VmHWM, is reset then through
/proc/self/clear_refs; glibc's mmap threshold is fixed so that freed tensors leave the RSS). Beside it, the
bytes the incremental path caches (padded activations of the unoccluded images), counted from its
tensors, and the largest input + output activation of one chunk through the full model (the
batched forward's working set, counted from the recorded shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from convlens.viz import occlusion_incremental
from convlens.viz.faithfulness import ssim
from convlens.viz.common import eval_mode
from convlens.viz.occlusion import default_max_batch, occlusion_maps, occlusion_result
from convlens.viz.occlusion_approximate import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_json import Report  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = {"vgg16": 3.0, "cifar": 1.5, "lenet": 1.0}  # incremental (automatic) speed-up over batched


def build(net: str, quick: bool = False):
    """(model, images, patch, stride) for one benchmark net."""
    torch.manual_seed(0)
    if net == "vgg16":
        from convlens.models.vgg import VGG16

        side, count = (64, 1) if quick else (224, 4)
        return VGG16(num_classes=1000, weights=None).eval(), torch.randn(count, 3, side, side), 25, 8
    if net == "cifar":
        from convlens.models.cifar import CifarConvNet

        return CifarConvNet(c3=256, c4=64).eval(), torch.randn(4 if quick else 16, 3, 32, 32), 7, 1
    if net == "lenet":
        from convlens.models.lenet import LeNet

        return LeNet().eval(), torch.randn(4 if quick else 16, 1, 28, 28), 7, 1
    raise SystemExit(f"unknown net {net!r}; use vgg16, cifar or lenet")


def plan_of(model, images, patch, stride, fill, incremental, tau=None):
    """What occlusion_maps would do: None (batched) or (switch layer, estimated ratio, cache bytes)."""
    with eval_mode(model):
        recorded = occlusion_incremental.record_forward(model, images)
        fill_t = torch.full(images.shape[1:], fill, dtype=images.dtype)
        runner = occlusion_incremental.prepare(model, images, recorded, patch, stride, fill_t, tau,
                                               force=incremental is True)
    if runner is None:
        return None, batched_working_set(recorded, images, patch, stride)
    info = dict(switch=runner.plan.switch, last_incremental=runner.names[-1],
                full_from=None if runner.plan.switch >= len(recorded.calls) else
                type(recorded.calls[runner.plan.switch].module).__name__,
                estimated_ratio=round(runner.plan.estimated_ratio, 3), cache_bytes=runner.cache_bytes())
    return info, batched_working_set(recorded, images, patch, stride)


def batched_working_set(recorded, images, patch, stride) -> int:
    """Bytes of the largest input + output activation of one chunk through the full model."""
    N, C, H, W = images.shape
    batch = min(default_max_batch(C, H, W), N * ((H - patch) // stride + 1) * ((W - patch) // stride + 1))
    per_copy = max(sum(int(torch.Size(s[1:]).numel()) for s in (c.in_shape, c.out_shape) if s)
                   for c in recorded.calls)
    return per_copy * batch * images.element_size()


def captum_runner(model, images, targets, patch, stride, fill, per_eval):
    from captum.attr import Occlusion

    occlusion = Occlusion(lambda x: model(x).softmax(dim=1))
    C = images.shape[1]

    def run():
        with torch.no_grad():
            occlusion.attribute(images, sliding_window_shapes=(C, patch, patch), strides=(C, stride, stride),
                                baselines=fill, target=targets, perturbations_per_eval=per_eval)
    return run


def best_per_eval(model, images, targets, patch, stride, fill, max_batch, log) -> tuple[int, dict]:
    """The fastest perturbations_per_eval among half, once and twice our batch, on a probe over
    fewer positions (a larger stride; at least two of the largest candidate's forward passes)."""
    N, _, H, W = images.shape
    candidates = sorted({max(1, max_batch // N // 2), max(1, max_batch // N), max(1, 2 * max_batch // N)})
    per_side = max(2, int((2 * candidates[-1]) ** 0.5) + 1)
    # captum wants strides no larger than the window
    probe_stride = min(patch, max(stride, (min(H, W) - patch) // (per_side - 1)))
    seconds = {}
    for per_eval in candidates:
        start = time.perf_counter()
        captum_runner(model, images, targets, patch, probe_stride, fill, per_eval)()
        seconds[per_eval] = round(time.perf_counter() - start, 3)
        log(f"  captum probe (stride {probe_stride}) perturbations_per_eval={per_eval}: {seconds[per_eval]:.2f} s")
    return min(seconds, key=seconds.get), seconds


def errors(approx, exact) -> dict:
    p, q = approx[0].double(), exact[0].double()
    diff = (p - q).abs()
    spread = (q.flatten(1).amax(1) - q.flatten(1).amin(1)).clamp_min(1e-30)
    return dict(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                max_rel_range=float((diff.flatten(1).amax(1) / spread).max()),
                label_agreement=float((approx[1] == exact[1]).double().mean()),
                argmin_agreement=float((p.flatten(1).argmin(1) == q.flatten(1).argmin(1)).double().mean()))


# --------------------------------------------------------------------------------------------
# Memory, in a fresh subprocess per variant
# --------------------------------------------------------------------------------------------

def memory_child(net: str, variant: str, quick: bool) -> None:
    model, images, patch, stride = build(net, quick)
    N, C, H, W = images.shape
    batch = default_max_batch(C, H, W)
    # a subset of positions: a larger stride, still at least three chunks of the same batch
    per_side = max(2, int((3 * batch / N) ** 0.5) + 1)
    stride = max(stride, (H - patch) // (per_side - 1))
    with torch.inference_mode():
        targets = model(images[:1]).argmax(1).expand(N).clone()
    kwargs = {"batched": dict(incremental=False), "incremental": dict(incremental=None),
              "forced": dict(incremental=True)}.get(variant) or dict(tau=float(variant.split("=")[1]))
    before, peak_source = reset_peak_rss()
    occlusion_maps(model, images, targets, patch=patch, stride=stride, fill=0.0, **kwargs)
    after = peak_rss_kib(peak_source)
    copies = N * ((H - patch) // stride + 1) * ((W - patch) // stride + 1)
    print(json.dumps(dict(rss_rise_mib=round((after - before) / 1024, 1), peak_rss_mib=round(after / 1024, 1),
                          copies=copies, batch=batch, stride=stride, peak_from=peak_source)))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> tuple[int, str]:
    """(the resident set now, in KiB, and how the peak will be read). Linux: the peak (VmHWM) is
    reset to the current RSS through /proc/self/clear_refs, so building the model does not mask
    the run's peak; elsewhere the rise of ru_maxrss over its value now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS"), "VmHWM"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def peak_rss_kib(source: str) -> int:
    return _status_kib("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory(net: str, variant: str, quick: bool) -> dict:
    # a fixed mmap threshold: glibc then returns freed tensors to the OS instead of keeping them in
    # its heap for reuse, so the resident set follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--memory-child", net, variant] + (["--quick"] if quick else []),
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------

def bench_net(net: str, repeats: int, taus: list[float], quick: bool, log) -> dict:
    model, images, patch, stride = build(net, quick)
    N, C, H, W = images.shape
    fill = 0.0
    max_batch = default_max_batch(C, H, W)
    positions = ((H - patch) // stride + 1) * ((W - patch) // stride + 1)
    with torch.inference_mode():
        targets = model(images).argmax(1)
    log(f"{net}: {N} images {C}x{H}x{W}, patch {patch}, stride {stride}: {positions} positions, "
        f"{N * positions} copies, batch {max_batch}")
    auto_plan, batched_bytes = plan_of(model, images, patch, stride, fill, None)
    forced_plan = None
    try:
        forced_plan, _ = plan_of(model, images, patch, stride, fill, True)
    except Exception as e:  # noqa: BLE001 - no incremental path at all: reported
        log(f"  forced incremental impossible: {e}")
    log(f"  automatic plan: {auto_plan}; forced plan: {forced_plan}")

    results: dict[str, dict] = {}
    maps: dict[str, tuple] = {}

    def ours(**kwargs):
        def run():
            return occlusion_maps(model, images, targets, patch=patch, stride=stride, fill=fill, **kwargs)
        return run

    cases = {"batched": ours(incremental=False), "incremental (automatic)": ours()}
    if forced_plan is not None and (auto_plan is None or forced_plan["switch"] != auto_plan["switch"]):
        cases["incremental (forced)"] = ours(incremental=True)
    for tau in taus:
        cases[f"tau={tau}"] = ours(tau=tau)
    per_eval, probe = best_per_eval(model, images, targets, patch, stride, fill, max_batch, log)
    cases[f"captum Occlusion, perturbations_per_eval={per_eval}"] = captum_runner(
        model, images, targets, patch, stride, fill, per_eval)
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            out = run()
            best[name] = min(best[name], time.perf_counter() - start)
            if out is not None:
                maps[name] = out
            log(f"  {name}: {time.perf_counter() - start:.2f} s")
    exact = maps["batched"]
    for name, seconds in best.items():
        row = dict(seconds=round(seconds, 3), copies_per_s=round(N * positions / seconds, 1),
                   speedup_vs_batched=round(best["batched"] / seconds, 2))
        if name in maps and name != "batched":
            row["error_vs_batched"] = errors(maps[name], exact)
        results[name] = row
    mem = {}
    for variant in ["batched", "incremental"] + (["forced"] if "incremental (forced)" in cases else []) + \
            [f"tau={tau}" for tau in taus]:
        mem[variant] = memory(net, variant, quick)
        log(f"  memory {variant}: {mem[variant]}")
    return dict(net=net, images=list(images.shape), patch=patch, stride=stride, positions=positions,
                copies=N * positions, batch=max_batch, repeats=repeats, automatic_plan=auto_plan,
                forced_plan=forced_plan, batched_working_set_bytes=batched_bytes, captum_probe_seconds=probe,
                results=results, memory=mem, target_speedup=TARGETS[net])


def print_tables(report: dict) -> None:
    for r in report["nets"]:
        plan = r["automatic_plan"]
        took = (f"incremental through {plan['last_incremental']} (call {plan['switch']}), then the full forward"
                if plan else "batched (the incremental path is not estimated to pay)")
        print(f"\n### {r['net']}: {r['images'][0]} images {'x'.join(map(str, r['images'][1:]))}, patch {r['patch']}, "
              f"stride {r['stride']}, {r['copies']} copies, batch {r['batch']}\n")
        print(f"Automatic path: {took}.\n")
        print("| case | time (s) | copies/s | speed-up vs batched | max abs error of p | label agreement |")
        print("|---|---|---|---|---|---|")
        for name, row in r["results"].items():
            err = row.get("error_vs_batched")
            error = f"{err['max_abs']:.2e} | {err['label_agreement']:.4f}" if err else "- | -"
            print(f"| {name} | {row['seconds']:.2f} | {row['copies_per_s']:.0f} | {row['speedup_vs_batched']:.2f} | "
                  f"{error} |")
        speedup = r["results"]["incremental (automatic)"]["speedup_vs_batched"]
        print(f"\ntarget >= {r['target_speedup']}x: {speedup:.2f}x -> "
              f"{'met' if speedup >= r['target_speedup'] else 'NOT met'}")
        print("\n| memory variant | peak RSS rise (MiB) | copies | cached activations (MiB) |")
        print("|---|---|---|---|")
        plans = {"incremental": plan, "forced": r["forced_plan"]}
        for variant, m in r["memory"].items():
            chosen = plans.get(variant)  # tau variants: their plan is not recorded
            cached = f"{chosen['cache_bytes'] / 2**20:.1f}" if chosen else "-"
            print(f"| {variant} | {m['rss_rise_mib']:.1f} | {m['copies']} | {cached} |")
        print(f"\nbatched working set (largest activation in + out of one chunk): "
              f"{r['batched_working_set_bytes'] / 2**20:.1f} MiB")
        taus = {k: v["error_vs_batched"] for k, v in r["results"].items() if k.startswith("tau=")}
        if taus:
            print("\n| tau | max abs | mean abs | max abs / range of p | labels same | argmin same |")
            print("|---|---|---|---|---|---|")
            for name, e in taus.items():
                print(f"| {name[4:]} | {e['max_abs']:.2e} | {e['mean_abs']:.2e} | {e['max_rel_range']:.3f} | "
                      f"{e['label_agreement']:.4f} | {e['argmin_agreement']:.2f} |")


def cpu_model() -> str:
    """lscpu's model name and the core count, e.g. 'AMD EPYC, 2 cores'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------
# --approximate: Krypton's drill-down (issue #23)
# --------------------------------------------------------------------------------------------

#: the settings compared: the preset, and a coarser one that trades quality for speed
APPROXIMATIONS = {"fast": dict(approximate="fast"), "coarse 4, drill 0.05": dict(coarse=4, drill=0.05)}
APPROX_TARGETS = {"vgg16": (35.0, 0.9), "cifar": (5.0, 0.95)}  # speed-up over batched, at SSIM >= this


def quality(approx, exact) -> dict:
    """SSIM per image (data range 1, and the exact map's own range), max |diff|, label agreement."""
    p, q = approx.prob.double(), exact.prob.double()
    low, high = q.amin((1, 2), keepdim=True), q.amax((1, 2), keepdim=True)
    span = (high - low).clamp_min(1e-30)
    unit, own = ssim(p, q, 1.0), ssim((p - low) / span, (q - low) / span, 1.0)
    return dict(ssim_mean=float(unit.mean()), ssim_min=float(unit.min()), ssim_own_range_mean=float(own.mean()),
                ssim_own_range_min=float(own.min()), max_abs=float((p - q).abs().max()),
                label_agreement=float((approx.label == exact.label).double().mean()))


def trained_cifar(log, device, quick=False):
    """CifarConvNet(256, 64) after 1 and 2 epochs on 10,000 CIFAR-10 training images, 16 test images
    with labels, and the normalization; random weights and images without the data."""
    from convlens.datamodules.cifar10 import CIFAR10_CLASSES
    from convlens.datamodules.images import load_image_folder
    from convlens.models.cifar import CifarConvNet

    root = Path(os.environ.get("DATA_DIR", HERE.parent.parent / "shared" / "datasets")) / "cifar10-jpg"
    torch.manual_seed(0)
    net = CifarConvNet(c3=256, c4=64)
    if not root.is_dir():
        log(f"  no CIFAR-10 under {root}: random weights and images")
        images = torch.randn(16, 3, 32, 32, device=device)
        return [net.state_dict()] * 3, net, images, torch.zeros(16, dtype=torch.long, device=device), 0.0, "random"
    x, y = load_image_folder(root / "train", size=32, channels=3, classes=list(CIFAR10_CLASSES))[:2]
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000 if quick else 10000]
    x, y = x[pick].float() / 255, y[pick]
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    states = []
    for epoch in range(3):
        if epoch == 2:  # late training: a hundredth of the learning rate, the maps move little
            for group in optimizer.param_groups:
                group["lr"] = 1e-5
        net.train()
        for batch in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(states[1])  # the net of the comparisons: after epoch 2
    tx, ty = load_image_folder(root / "test", size=32, channels=3, classes=list(CIFAR10_CLASSES))[:2]
    pick = torch.randperm(len(tx), generator=torch.Generator().manual_seed(1))
    test = (tx[pick[:2000]].float() / 255 - mean) / std
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test).argmax(1) == ty[pick[:2000]]).double().mean())
    log(f"  trained: test accuracy {accuracy:.3f} on 2,000 test images")
    fill = ((0.5 - mean) / std)[0]
    return states, net, test[:16].to(device), ty[pick[:16]].to(device), fill.to(device), f"trained, {accuracy:.3f}"


def timed(run):
    start = time.perf_counter()
    out = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def per_copy_seconds(model, images, targets, patch, stride, fill, log) -> tuple[float, float, int]:
    """(batched, best captum) seconds per occluded copy of `images` at `stride`, and captum's best
    perturbations_per_eval among half, once and twice our batch (divided by the image count: captum
    evaluates that many positions of every image per forward pass)."""
    N, C, H, W = images.shape
    copies = N * ((H - patch) // stride + 1) * ((W - patch) // stride + 1)
    _, batched = timed(lambda: occlusion_maps(model, images, targets, patch=patch, stride=stride, fill=fill,
                                              incremental=False))
    batch = default_max_batch(C, H, W)
    seconds = {}
    for per_eval in sorted({max(1, batch // N // 2), max(1, batch // N), max(1, 2 * batch // N)}):
        _, seconds[per_eval] = timed(captum_runner(model, images, targets, patch, stride, fill, per_eval))
        log(f"  captum perturbations_per_eval={per_eval}: {seconds[per_eval] / copies:.3f} s per copy")
    best = min(seconds, key=seconds.get)
    return batched / copies, seconds[best] / copies, best


def approximate_cases(report, name, model, images, targets, patch, stride, fill, batched_per_copy, captum, log):
    """One table: exact incremental, each approximation, batched and captum (scaled), with quality."""
    N, _, H, W = images.shape
    copies = N * ((H - patch) // stride + 1) * ((W - patch) // stride + 1)
    kwargs = dict(patch=patch, stride=stride, fill=fill)
    exact, exact_s = timed(lambda: occlusion_result(model, images, targets, **kwargs))
    log(f"  {name} exact incremental: {exact_s:.1f} s")
    batched_s = batched_per_copy * copies if captum else None
    rows = {}
    for label, options in APPROXIMATIONS.items():
        approx, seconds = timed(lambda: occlusion_result(model, images, targets, **kwargs, **options))
        rows[label] = dict(seconds=seconds, copies=approx.copies, **quality(approx, exact))
        log(f"  {name} {label}: {seconds:.1f} s, {rows[label]}")
    if batched_s is None:  # small nets: the batched forward in full
        _, batched_s = timed(lambda: occlusion_maps(model, images, targets, incremental=False, **kwargs))
    report.print(f"\n### {name}: {N} images {H}x{W}, patch {patch}, stride {stride}, {copies} copies\n")
    report.print("| case | seconds | copies | x batched | x exact incremental | SSIM mean (min) | "
                 "SSIM own range mean (min) | max abs diff | labels same |")
    report.print("|---|---|---|---|---|---|---|---|---|")
    report.print(f"| batched full forward{' (scaled)' if captum else ''} | {batched_s:.1f} | {copies} | 1.00 | "
                 f"{exact_s / batched_s:.2f} | - | - | - | - |")
    if captum:
        captum_per_copy, per_eval = captum
        report.print(f"| captum Occlusion, perturbations_per_eval={per_eval} (scaled) | {captum_per_copy * copies:.1f} "
                     f"| {copies} | {batched_s / (captum_per_copy * copies):.2f} | - | - | - | - | - |")
    report.print(f"| exact incremental | {exact_s:.1f} | {copies} | {batched_s / exact_s:.2f} | 1.00 | 1 | 1 | 0 | 1 |")
    for label, r in rows.items():
        report.print(f"| {label} | {r['seconds']:.1f} | {r['copies']} | {batched_s / r['seconds']:.2f} | "
                     f"{exact_s / r['seconds']:.2f} | {r['ssim_mean']:.3f} ({r['ssim_min']:.3f}) | "
                     f"{r['ssim_own_range_mean']:.3f} ({r['ssim_own_range_min']:.3f}) | {r['max_abs']:.2e} | "
                     f"{r['label_agreement']:.4f} |")
    return dict(batched_s=batched_s, exact_s=exact_s, copies=copies, approximations=rows), exact


def bench_approximate(nets: list[str], strides: list[int], device: str, quick: bool, log) -> None:
    report = Report("occlusion_approximate")
    report.print(f"device {device}; presets {PRESETS}")
    results = {}
    if "cifar" in nets:
        log("training the CIFAR net")
        states, net, images, labels, fill, weights = trained_cifar(log, device, quick)
        if quick:
            images, labels = images[:4], labels[:4]
        net.to(device)
        report.print(f"\ncifar: CifarConvNet(256, 64), {weights}")
        # captum's best perturbations_per_eval, probed at stride 3 (a ninth of the copies)
        per_copy, captum_s, per_eval = per_copy_seconds(net, images, labels, 7, 3, fill, log)
        results["cifar"], exact = approximate_cases(report, "cifar", net, images, labels, 7, 1, fill, per_copy,
                                                    None, log)
        # captum in full on the small net
        _, captum_full = timed(captum_runner(net, images, labels, 7, 1, fill, per_eval))
        report.print(f"\ncaptum Occlusion (perturbations_per_eval={per_eval}) in full: {captum_full:.1f} s "
                     f"({results['cifar']['batched_s'] / captum_full:.2f}x the batched forward)")
        # reuse across epochs: the maps of one epoch reused in the next
        report.print("\nreuse across epochs (fast preset; the maps of the earlier epoch reused in the later one; "
                     "quality against the later epoch's exact maps):\n")
        report.print("| epochs | reuse_tol | seconds | copies | x batched | SSIM mean (min) | max abs diff | "
                     "labels same |")
        report.print("|---|---|---|---|---|---|---|---|")
        reuse = {}
        kwargs = dict(patch=7, stride=1, fill=fill, approximate="fast")
        for before, after, what in ((0, 1, "1 -> 2"), (1, 2, "2 -> 3 (lr 1e-5)")):
            net.load_state_dict(states[before])
            first = occlusion_result(net.eval(), images, labels, **kwargs)
            net.load_state_dict(states[after])
            exact_after = exact if after == 1 else occlusion_result(net, images, labels, patch=7, stride=1, fill=fill)
            for tol in (None, 0.005, 0.02, 0.05):
                out, seconds = timed(lambda: occlusion_result(net, images, labels, **kwargs, previous=first,
                                                              reuse_tol=tol))
                q = quality(out, exact_after)
                reuse[f"{what}, {tol}"] = dict(seconds=seconds, copies=out.copies, **q)
                report.print(f"| {what} | {tol if tol is not None else 'off'} | {seconds:.1f} | {out.copies} | "
                             f"{results['cifar']['batched_s'] / seconds:.2f} | {q['ssim_mean']:.3f} "
                             f"({q['ssim_min']:.3f}) | {q['max_abs']:.2e} | {q['label_agreement']:.4f} |")
        net.load_state_dict(states[1])
        results["cifar"].update(reuse=reuse, weights=weights, captum_full_s=captum_full)
        report.save(extra=dict(results=results))
    if "vgg16" in nets:
        from convlens.models.vgg import VGG16

        torch.manual_seed(0)
        side, count = (64, 1) if quick else (224, 4)
        model = VGG16(num_classes=1000, weights=None).eval().to(device)
        images = torch.randn(count, 3, side, side, device=device)
        with torch.inference_mode():
            targets = model(images).argmax(1)
        per_copy, captum_s, per_eval = per_copy_seconds(model, images[:1], targets[:1], 25, 25, 0.0, log)
        report.print(f"\nvgg16: random weights; batched {per_copy:.3f} s and captum {captum_s:.3f} s per copy "
                     f"(perturbations_per_eval={per_eval}), timed on 1 image at stride 25")
        for stride in strides:
            results[f"vgg16_stride{stride}"], _ = approximate_cases(
                report, f"vgg16 stride {stride}", model, images, targets, 25, stride, 0.0, per_copy,
                (captum_s, per_eval), log)
            report.save(extra=dict(results=results))
    for name, r in results.items():
        speed, level = APPROX_TARGETS["cifar" if name == "cifar" else "vgg16"]
        for label, a in r["approximations"].items():
            x = r["batched_s"] / a["seconds"]
            met = x >= speed and a["ssim_mean"] >= level
            report.print(f"target {name} {label}: >= {speed}x at SSIM >= {level}: {x:.1f}x, SSIM {a['ssim_mean']:.3f} "
                         f"(own range {a['ssim_own_range_mean']:.3f}) -> {'met' if met else 'MISSED'}")
    report.save(extra=dict(results=results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="vgg16,cifar,lenet")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats, best kept (CIFAR, LeNet)")
    parser.add_argument("--vgg-repeats", type=int, default=1)
    parser.add_argument("--taus", default="0.5,0.8", help="approximation thresholds ('' for none)")
    parser.add_argument("--json", default=str(HERE / "occlusion.json"))
    parser.add_argument("--quick", action="store_true", help="small settings, for trying the script out")
    parser.add_argument("--print", metavar="JSON", help="print the tables of a saved run and exit")
    parser.add_argument("--memory-child", nargs=2, metavar=("NET", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--approximate", action="store_true", help="the drill-down benchmark (issue #23)")
    parser.add_argument("--strides", default="8,4", help="VGG16 strides of --approximate")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (--approximate)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.quick)
        return
    if args.print:
        print_tables(json.loads(Path(args.print).read_text()))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.approximate:
        nets = args.nets.split(",") if args.nets != parser.get_default("nets") else ["cifar", "vgg16"]
        bench_approximate(nets, [int(s) for s in args.strides.split(",")], args.device, args.quick, log)
        return
    taus = [float(t) for t in args.taus.split(",") if t]
    started = time.strftime("%Y-%m-%d %H:%M")
    report = dict(date=started, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine=cpu_model(), nets=[])
    for net in args.nets.split(","):
        report["nets"].append(bench_net(net, args.vgg_repeats if net == "vgg16" else args.repeats, taus,
                                        args.quick, log))
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")  # after every net: partial results survive
    report["finished"] = time.strftime("%Y-%m-%d %H:%M")
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"torch {report['torch']}, {report['threads']} threads, {report['cpus']} CPUs; started {started}, "
          f"finished {report['finished']}")
    print_tables(report)


if __name__ == "__main__":
    main()
