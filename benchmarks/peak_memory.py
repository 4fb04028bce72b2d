"""Peak memory of a command and everything it starts, e.g. the default `dvc repro`.

    python benchmarks/peak_memory.py                  # dvc repro --force (every stage runs)
    python benchmarks/peak_memory.py -- dvc repro -s iet

DVC runs each stage in a process of its own, one after another, so what bounds the machine is the
largest of those processes: the kernel's maximum resident set size over every descendant that was
waited for (getrusage(RUSAGE_CHILDREN), what `/usr/bin/time -v` reports too). Also printed: the wall
time, and the peak as a fraction of this machine's memory.
"""
import os
import resource
import subprocess
import sys
import time

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def main(command):
    command = list(command) or ["dvc", "repro", "--force"]
    start = time.perf_counter()
    code = subprocess.call(command)
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB on Linux
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"{' '.join(command)}: exit {code}, {wall / 60:.1f} min wall")
    print(f"peak resident memory of the largest process: {peak_gib:.2f} GiB "
          f"= {peak_gib / total_gib:.3f} of this machine's {total_gib:.1f} GiB")
    sys.exit(code)


if __name__ == "__main__":
    main()
