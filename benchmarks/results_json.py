"""Figures of a benchmark script, printed as today and also written as JSON next to RESULTS.md.

    report = Report("callbacks")        # -> benchmarks/callbacks.json
    report.print("| a | b |")           # printed, and kept
    report.save(extra={"epoch_s": 1.2})  # every markdown table printed becomes a list of rows

The JSON carries the date, the machine, the command and the load average, so a figure in
RESULTS.md can be traced to the run that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def json_dir() -> Path:
    """Where the JSON files go: beside RESULTS.md, or $BENCH_JSON_DIR (e.g. a device run's $OUT,
    so a dry run or a remote run does not overwrite the committed figures)."""
    return Path(os.environ.get("BENCH_JSON_DIR") or HERE)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def tables(lines: list[str]) -> list[list[dict]]:
    """The markdown tables among `lines`, each as a list of {header: cell} rows."""
    found, header, rows = [], None, []
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(dict(zip(header, cells)))
            continue
        if header is not None:
            found.append(rows)
        header, rows = None, []
    return found


class Report:
    def __init__(self, name: str, path: Path | None = None):
        self.path = path or json_dir() / f"{name}.json"
        self.lines: list[str] = []
        self.started = time.strftime("%Y-%m-%d %H:%M")

    def print(self, *parts, **kwargs) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, **kwargs)
        self.lines.extend(text.splitlines())

    def save(self, extra: dict | None = None) -> Path:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        data = {"date": self.started, "machine": machine(), "command": command,
                "load_average_1min": round(os.getloadavg()[0], 2), "tables": tables(self.lines),
                "lines": self.lines, **(extra or {})}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)
        return self.path
