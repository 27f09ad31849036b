"""Checks an Autobahn TestSuite report (reports/index.json) and prints the
results by section: cases 1-10 must be OK, NON-STRICT or INFORMATIONAL,
12 and 13 (compression, not negotiated) UNIMPLEMENTED. Exits 1 otherwise."""
import collections
import json
import sys

SECTIONS = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 handling", "7": "Close handling",
    "9": "Limits/performance", "10": "Miscellaneous",
    "12": "WebSocket compression (permessage-deflate)",
    "13": "WebSocket compression (different parameters)",
}
ALLOWED = {"OK", "NON-STRICT", "INFORMATIONAL"}

report = json.load(open(sys.argv[1]))
cases = next(iter(report.values()))
by_section = collections.defaultdict(collections.Counter)
bad = []
for case, result in cases.items():
    section = case.split(".")[0]
    behavior = result["behavior"]
    close = result["behaviorClose"]
    by_section[section][behavior] += 1
    compression = section in ("12", "13")
    ok = behavior == "UNIMPLEMENTED" if compression else (
        behavior in ALLOWED and close in ALLOWED | {"UNIMPLEMENTED"})
    if not ok:
        bad.append((case, behavior, close))

print("| section | cases | result |")
print("|---|---|---|")
for section in sorted(by_section, key=int):
    counts = by_section[section]
    text = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
    name = SECTIONS.get(section, "")
    print(f"| {section} {name} | {sum(counts.values())} | {text} |")
if bad:
    print(f"\nautobahn: {len(bad)} case(s) failed:", file=sys.stderr)
    for case, behavior, close in sorted(bad):
        print(f"  {case}: {behavior} (close: {close})", file=sys.stderr)
    sys.exit(1)
print(f"\nautobahn: all {len(cases)} cases passed")
