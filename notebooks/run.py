"""Execute the exploration notebooks in place, each under a wall-clock cap (``make notebooks``).

    python notebooks/run.py [--cap SECONDS] [--out DIR] [NOTEBOOK ...]

Default: every ``notebooks/0*_*.ipynb``, in name order, written back in place; ``--out``
writes the executed copies there instead. A notebook that fails or runs past its cap is not
written, and the exit status is 1. Outputs are kept small for a code host: a figure keeps
only its PNG (not its ``<Figure ...>`` text), progress bars are dropped, no timing metadata.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, cap_s: float) -> nbformat.NotebookNode:
    """Run every code cell of ``path`` in a fresh kernel (working directory: the notebook's)
    within ``cap_s`` seconds in all; raises on a cell error or timeout."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(HERE)}}
    )
    deadline = time.monotonic() + cap_s
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path.name}: past its {cap_s:.0f} s cap at cell {index}")
            client.timeout = int(left) + 1
            client.execute_cell(cell, index)
    return nb


def is_noise(output: nbformat.NotebookNode) -> bool:
    """A stderr stream of progress bars (tqdm, weight loading), tqdm's widget warning or
    nothing."""
    text = str(output.get("text", ""))
    noise = "\r" in text or "it/s]" in text or "TqdmWarning" in text or not text.strip()
    return output.get("name") == "stderr" and noise


def slim(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop progress bars and the text form of figures that also have a PNG."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and is_noise(out):
                continue
            data = out.get("data", {})
            if "image/png" in data:
                data.pop("text/plain", None)
            kept.append(out)
        cell.outputs = kept
    return nb


def child_cpu_s() -> float:
    """CPU seconds (user + system) of the finished kernels so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--cap", type=float, default=600.0, help="seconds per notebook")
    parser.add_argument("--out", type=Path, default=None, help="write here, not in place")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("0*_*.ipynb"))
    failed = 0
    for path in paths:
        t0, cpu0 = time.monotonic(), child_cpu_s()
        try:
            nb = slim(execute(path, args.cap))
        except Exception as exc:  # noqa: BLE001 - reported, the others still run
            failed += 1
            print(f"FAILED {path.name} after {time.monotonic() - t0:.0f} s: {exc}", flush=True)
            continue
        target = (args.out / path.name) if args.out else path
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        wall, cpu = time.monotonic() - t0, child_cpu_s() - cpu0
        print(f"ok     {path.name}: {wall:.0f} s wall, {cpu:.0f} s CPU -> {target}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
