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

from convlens.viz import occlusion_incremental
from convlens.viz.common import eval_mode
from convlens.viz.occlusion import default_max_batch, occlusion_maps

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
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.quick)
        return
    if args.print:
        print_tables(json.loads(Path(args.print).read_text()))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

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
