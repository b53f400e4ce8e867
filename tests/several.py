"""Several command lines in one process: `python tests/several.py JOBS.json`, or under torchrun
(`torchrun --nproc-per-node 2 tests/several.py JOBS.json`), where each rank runs every job in turn.

JOBS.json holds a list of command lines, each `["simclr.py", "--dataset", ...]` or `["-m", "common.linear",
...]`. Each runs as `python simclr.py ...` (or `python -m common.linear ...`) would: the file executed as `__main__` with that `sys.argv` (the real command
line: `cli.parse` reading `sys.argv`, its signal handler and excepthook, config.json's `command`, and
under torchrun the real agent and its store). What the suite saves is the start of a process: importing
torch and torchvision costs about 10 s of CPU, and torchrun's agent and two workers three times that.

Rank 0 prints `== job N: <command line>` before each job and `== job N ok` after it; a job that exits
non-zero ends the process with its exit status and message, as the job's own process would have ended.
"""
import json
import os
import runpy
import sys


def main(path):
    jobs = json.loads(open(path).read())
    rank, attempt = os.environ.get("RANK", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for n, argv in enumerate(jobs):
        if rank == "0":
            print(f"== job {n}: {' '.join(argv)}", flush=True)
        # A second process group in this process must not read the first one's addresses from torchrun's store
        # (common.dist keeps groups apart per attempt): each job is an attempt of its own.
        os.environ["TORCHELASTIC_RESTART_COUNT"] = f"{attempt}.job{n}"
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]  # (runpy puts the module's path in sys.argv[0])
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        if rank == "0":
            print(f"== job {n} ok", flush=True)
    print(f"== done ({len(jobs)} jobs)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
