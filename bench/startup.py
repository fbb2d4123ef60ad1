#!/usr/bin/env python3
"""Start-up time: from exec of lottery-server to its `action: listen` line on stdout.

    bench/startup.py [--files DIR] SERVER_BINARY...

Runs each binary RUNS times (default 21), interleaved, on a fresh bets.csv, or on a copy of
DIR's bets.csv (and bets.csv.round, if there) to time a restart that must read them back; prints
the median and the minimum in milliseconds. Settings (SERVER_TLS_CERT, ...) come from the
environment; SERVER_IP, SERVER_PORT and SERVER_STORAGE_PATH are set here. bash cannot time a
few milliseconds without its own start-up in the way, hence Python.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def once(binary, files):
    with tempfile.TemporaryDirectory() as work:
        if files:
            for name in ("bets.csv", "bets.csv.round"):
                if os.path.exists(os.path.join(files, name)):
                    shutil.copy(os.path.join(files, name), work)
        env = dict(os.environ, SERVER_IP="127.0.0.1", SERVER_PORT="0",
                   SERVER_STORAGE_PATH=os.path.join(work, "bets.csv"))
        start = time.perf_counter()
        server = subprocess.Popen([binary], stdout=subprocess.PIPE, env=env, cwd=work)
        listening = None
        for line in server.stdout:
            if b"action: listen" in line:
                listening = time.perf_counter()
                break
        server.terminate()
        server.wait()
        if listening is None:
            sys.exit(f"{binary} did not listen")
        return (listening - start) * 1000


def main():
    args = sys.argv[1:]
    files = None
    if args[:1] == ["--files"]:
        files, args = args[1], args[2:]
    if not args:
        sys.exit(__doc__)
    times = {binary: [] for binary in args}
    for _ in range(int(os.environ.get("RUNS", "21"))):
        for binary in args:
            times[binary].append(once(binary, files))
    for binary, ms in times.items():
        print(f"{statistics.median(ms):7.2f} ms median, {min(ms):7.2f} ms min  {binary}")


if __name__ == "__main__":
    main()
