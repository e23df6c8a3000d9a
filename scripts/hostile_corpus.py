"""Runs `scconv-tch export` on every file of the hostile-checkpoint corpus (written by
`parity/write_hostile_checkpoints.py`) and counts the promises kept, for issue 18's note:

    python scripts/hostile_corpus.py --corpus DIR --bin target/release/scconv-tch [--json OUT]

A case keeps its promises when: a "loads" case exits 0; a "refused" case exits 1 or 2 with exactly
one `error:` line of at most 800 characters on stderr, holding the case's `says` text; and either way it ends within 10 s with a peak
resident memory under 1 GiB above the same command's on the plain state dict (`plain.pt`). Each run
is limited to 4 GiB of address space.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

LIMIT_S = 10
LIMIT_RSS_KIB = 1 << 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--json", help="write the per-case results here")
    args = parser.parse_args()
    manifest = json.load(open(os.path.join(args.corpus, "manifest.json")))
    work = tempfile.mkdtemp()
    config = os.path.join(work, "config.json")
    json.dump(manifest["config"], open(config, "w"))
    results, baseline = [], None
    for case in sorted(manifest["cases"], key=lambda c: c["name"] != "plain"):
        rc, stderr, wall, rss = measured(args.bin, config, case, args.corpus, os.path.join(work, "out.pt"))
        baseline = rss if baseline is None else baseline
        lines = stderr.strip().splitlines()
        if case["expect"] == "loads":
            shape = rc == 0
        else:
            shape = rc in (1, 2) and len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) <= 800
            shape = shape and (case.get("says") or "") in lines[0]
        kept = shape and wall <= LIMIT_S and rss - baseline <= LIMIT_RSS_KIB
        results.append({"name": case["name"], "class": case["class"], "expect": case["expect"], "rc": rc,
                        "wall_s": round(wall, 2), "peak_rss_mib": rss >> 10, "kept": kept,
                        "stderr": stderr[:300]})
        mark = "ok  " if kept else "FAIL"
        print(f"{mark} {case['name']:28} rc={rc:<4} {wall:6.2f} s {rss >> 10:6} MiB  {stderr.strip()[:110]!r}")
    kept = sum(r["kept"] for r in results)
    print(f"{kept} of {len(results)} cases keep the promises ({args.bin})")
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


def limit_memory():
    """The child's address space limited to 4 GiB, as in the Rust test: a reader that allocates what a
    file declares fails alone instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def measured(binary, config, case, corpus, out):
    """rc, stderr, wall seconds and the child's own peak RSS in KiB (wait4's rusage)."""
    command = [binary, "export", "--scconv", config, "--weights", os.path.join(corpus, case["file"]),
               "--out", out, "--force"]
    if case["select"] is not None:
        command += ["--select", case["select"]]
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit_memory)
        deadline = start + 60
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
            time.sleep(0.02)
        wall = time.monotonic() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    return rc, stderr, wall, usage.ru_maxrss


if __name__ == "__main__":
    sys.exit(main())
