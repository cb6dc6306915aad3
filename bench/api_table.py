"""Turn bench/api_bench.py's JSON lines (stdin) into the rows of a RESULTS.md table."""

import json
import sys

for line in sys.stdin:
    r = json.loads(line)
    b = r["bench"]
    if b == "tasks":
        print(
            f"| {r['n']} tasks via SDK (fork, write 64 KiB, run, read, kill) | {r['sdk_s']:.1f} s "
            f"| `fork -n {r['n']} --exec` {r['cli_floor_s']:.1f} s | **{r['ratio']:.2f}x** (goal <= 1.5x) |"
        )
    elif b == "overhead":
        print(
            f"| `commands.run(\"true\")` p50 over {r['n']} | {r['api_p50_ms']:.1f} ms "
            f"| agent round trip {r['agent_p50_ms']:.1f} ms | **{r['extra_ms']:+.1f} ms** (goal <= +5 ms) |"
        )
    elif b == "files":
        print(
            f"| 100 MiB write + read back, sha256 intact | write {r['write_s']:.1f} s, read {r['read_s']:.1f} s "
            f"| — | daemon peak RSS **{r['peak_rss_kib'] / 1024:.1f} MiB** (goal < 64) |"
        )
    elif b == "idle":
        print(
            f"| {r['children']} idle children | daemon RSS **{r['daemon_rss_kib'] / 1024:.1f} MiB** (goal <= 64) "
            f"| running: {r['running_cpu_s_per_child_per_s'] * 100:.2f} % CPU/child "
            f"| paused: **{r['paused_cpu_s_per_child_per_s'] * 100:.3f} % CPU/child** ({r['paused_ticks_total']} ticks in 5 s) |"
        )
