#!/usr/bin/env bash
# Runs the property tests of tests/fuzz/ (config parsing, routing, hop-by-hop headers) for a
# bounded time with many more cases than CI does. Each round draws fresh random inputs; rounds
# repeat until the time is up. A failure stops the run and prints the shrunk input.
#
#   scripts/fuzz.sh                    # 10 minutes, 5000 cases per property per round
#   FUZZ_SECONDS=60 PROPTEST_CASES=1000 scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-5000}"
seconds="${FUZZ_SECONDS:-600}"
cargo test --test fuzz --no-run
end=$((SECONDS + seconds))
round=0
while ((SECONDS < end)); do
    round=$((round + 1))
    left=$((end - SECONDS))
    echo "fuzz: round $round, $PROPTEST_CASES cases per property, ${left}s left"
    status=0
    timeout "$left" cargo test --test fuzz || status=$?
    if ((status == 124)); then
        echo "fuzz: time is up during round $round; no failure found"
        exit 0
    elif ((status != 0)); then
        echo "fuzz: FAILED in round $round (see the minimal failing input above)"
        exit "$status"
    fi
done
echo "fuzz: $round rounds, no failure found"
