"""Ratio table from a pytest-benchmark JSON file of bench_residual_update.py (or of another suite
whose benchmarks give their traffic as extra_info["traffic_in_copies"], e.g. bench_batch_norm_residual_update.py).

usage: python bench/ratios.py BENCH.json
For each group (pass, shape, dtype): median ms of each implementation, fused speed-up vs eager
and vs torch.compile, and fused time / bandwidth limit, where the limit is the minimum traffic of
docs/ops.md (3N forward, 3N backward, 6N both) at the speed of the same-size copy_ (2N).
"""
import json
import sys

TRAFFIC_IN_COPIES = {"fwd": 1.5, "bwd": 1.5, "fwd+bwd": 3.0}


def main(path):
    groups, traffic = {}, {}
    for b in json.load(open(path))["benchmarks"]:
        groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b["stats"]["median"] * 1e3
        if "traffic_in_copies" in b["extra_info"]:  # a suite states its own op's traffic
            traffic[b["group"]] = b["extra_info"]["traffic_in_copies"]
    header = (f"{'group':50s} {'fused':>8s} {'eager':>8s} {'compile':>8s} {'limit':>8s} {'vs eager':>9s} "
              f"{'vs compile':>10s} {'/ limit':>8s}")
    print(header)
    print("-" * len(header))
    for group, t in sorted(groups.items()):
        pass_ = group.split()[1]
        limit = t["copy"] * traffic.get(group, TRAFFIC_IN_COPIES.get(pass_))
        print(f"{group:50s} {t['fused']:8.2f} {t['eager']:8.2f} {t['compile']:8.2f} {limit:8.2f} "
              f"{t['eager'] / t['fused']:8.2f}x {t['compile'] / t['fused']:9.2f}x {t['fused'] / limit:7.2f}x")
    print("(median ms per call; limit = minimum bytes moved at copy_ speed)")


if __name__ == "__main__":
    main(sys.argv[1])
