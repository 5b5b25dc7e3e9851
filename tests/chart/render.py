#!/usr/bin/env python3
"""Lints and renders a Helm chart with the real Helm SDK (helm-python-sdk).

Used by tests/tests/chart.rs; prints one JSON document on stdout:

    render.py lint CHART [VALUES.yaml]
        {"helm": "v4.x.y", "total_charts_linted": N,
         "messages": [{"severity": 0-3, "path": ..., "error": ...}], "errors": [...]}
        (severity: 0 unknown, 1 info, 2 warning, 3 error)
    render.py render CHART [VALUES.yaml] [--name NAME] [--namespace NS]
        {"helm": "v4.x.y", "manifests": {"lb-agent/templates/x.yaml": "<yaml>", ...}}
        A template error exits 2 with {"error": "..."}.

Values files are parsed by Helm itself (helm_python.values_from_yaml), so
nothing else needs to be installed.
"""

import argparse
import json
import sys

try:
    import helm_python as helm
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(
        f"cannot import helm_python ({e}): run `cargo xtask setup` "
        "(installs tests/chart/requirements.txt)",
        file=sys.stderr,
    )
    sys.exit(3)


def load_values(path):
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return helm.values_from_yaml(f.read())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["lint", "render"])
    p.add_argument("chart")
    p.add_argument("values", nargs="?")
    p.add_argument("--name", default="lb")
    p.add_argument("--namespace", default="kube-system")
    a = p.parse_args()

    values = load_values(a.values)
    out = {"helm": helm.helm_sdk_version()}
    if a.command == "lint":
        out.update(helm.lint(a.chart, values, namespace=a.namespace))
    else:
        try:
            with helm.Chart.load(a.chart) as chart:
                out["manifests"] = chart.render(
                    values, name=a.name, namespace=a.namespace, is_install=True
                )
        except helm.HelmError as e:
            json.dump({"helm": out["helm"], "error": str(e)}, sys.stdout)
            sys.exit(2)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
