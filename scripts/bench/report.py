"""Summarises GNU `time -v` outputs of a benchmark run: report.py DIR NAME... (first NAME is the subject)."""
import re
import sys

work, names = sys.argv[1], sys.argv[2:]


def parse(name):
    text = open(f"{work}/{name}.time").read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    system = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    return secs, rss_kb / 1024, user, system


rows = {n: parse(n) for n in names}
subject = rows[names[0]][0]
print(f"{'run':<10} {'wall s':>8} {'user s':>8} {'sys s':>8} {'peak RSS MB':>12} {'wall / ' + names[0]:>16}")
for n, (secs, rss, user, system) in rows.items():
    print(f"{n:<10} {secs:>8.2f} {user:>8.2f} {system:>8.2f} {rss:>12.1f} {secs / subject:>16.2f}")
