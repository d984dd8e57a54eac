"""Parses an exposition (stdin) with Python's prometheus_client, as
tests/metrics.rs asks: with the OpenMetrics parser (strict: types, units,
`_total`, `# EOF`) and with the Prometheus text parser, which must find
the same samples. Prints one sample a line, `name<TAB>labels<TAB>value`,
labels as `k=v` joined by `,` in key order; exits 1 (with why) if either
parser refuses the text or they disagree.
"""

import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus


def samples(parse, text: str) -> set:
    return {
        (s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())), float(s.value))
        for family in parse(text)
        for s in family.samples
    }


def main() -> int:
    text = sys.stdin.read()
    try:
        om = samples(openmetrics, text)
    except Exception as e:
        print(f"the OpenMetrics parser refused it: {e}", file=sys.stderr)
        return 1
    try:
        prom = samples(prometheus, text)
    except Exception as e:
        print(f"the Prometheus text parser refused it: {e}", file=sys.stderr)
        return 1
    if om != prom:
        print(f"the parsers disagree: {sorted(om ^ prom)[:10]}", file=sys.stderr)
        return 1
    for name, labels, value in sorted(om):
        print(f"{name}\t{labels}\t{value!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
