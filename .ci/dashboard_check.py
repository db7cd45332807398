#!/usr/bin/env python3
"""Checks for grafana/veilgate.json and deploy/prometheus/alerts.yml (used by .ci/prometheus-check.sh).

  dashboard_check.py static DASHBOARD
      valid JSON, schemaVersion, id null, fixed uid, the `datasource` variable, unique panel ids,
      gridPos inside 24 columns without overlaps, every panel and target on ${datasource},
      only timeseries/stat/row panels, every target with an expr.

  dashboard_check.py eval DASHBOARD PROMETHEUS_URL SCRAPE_FILE [RULES_FILE]
      evaluates every dashboard expr (and variable query, and alert rule expr) through
      PROMETHEUS_URL/api/v1/query; fails on a query error, on a dashboard query with no result,
      and on any veilgate_* metric name that the scrape in SCRAPE_FILE does not contain.
      With RULES_FILE, also requires every loaded rule to be healthy (/api/v1/rules).
"""

import json
import re
import sys
import urllib.parse
import urllib.request

DS = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat"}
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+)|\[\[(\w+)(?::\w+)?\]\])")
METRIC = re.compile(r"\bveilgate_[a-z_]+\b")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class Report:
    def __init__(self):
        self.errors = []

    def fail(self, msg):
        self.errors.append(msg)
        print(f"  FAIL {msg}")

    def ok(self, msg):
        print(f"  ok   {msg}")


def all_panels(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        for child in p.get("panels", []) or []:
            yield child


def variables(dashboard):
    return (dashboard.get("templating") or {}).get("list") or []


# ---------------------------------------------------------------- static


def static(path):
    r = Report()
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        r.fail(f"{path}: not valid JSON: {e}")
        return r
    r.ok(f"{path} is valid JSON")
    if not isinstance(d, dict):
        r.fail("top level is not an object")
        return r

    sv = d.get("schemaVersion")
    if isinstance(sv, int) and not isinstance(sv, bool) and sv > 0:
        r.ok(f"schemaVersion {sv}")
    else:
        r.fail(f"schemaVersion missing or not a positive integer: {sv!r}")
    if "id" in d and d["id"] is None:
        r.ok('"id": null')
    else:
        r.fail(f'"id" must be present and null (got {d.get("id", "<absent>")!r})')
    if isinstance(d.get("uid"), str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]):
        r.ok(f'uid "{d["uid"]}"')
    else:
        r.fail(f"uid missing or invalid: {d.get('uid')!r}")
    if not d.get("title"):
        r.fail("title missing")

    vs = {v.get("name"): v for v in variables(d)}
    dsv = vs.get("datasource")
    if dsv and dsv.get("type") == "datasource" and dsv.get("query") == "prometheus":
        r.ok('variable "datasource" (type datasource, query prometheus)')
    else:
        r.fail('templating needs a variable "datasource" with type "datasource" and query "prometheus"')
    for name, v in vs.items():
        if v.get("type") == "query" and v.get("datasource") != DS:
            r.fail(f"variable {name!r}: datasource {v.get('datasource')!r}, want {DS}")

    panels = list(all_panels(d))
    if not panels:
        r.fail("no panels")
    ids = [p.get("id") for p in panels]
    bad_ids = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    dup = sorted({i for i in ids if ids.count(i) > 1 and i not in bad_ids}, key=str)
    if bad_ids:
        r.fail(f"panel ids that are not integers: {bad_ids}")
    if dup:
        r.fail(f"duplicate panel ids: {dup}")
    if not bad_ids and not dup:
        r.ok(f"{len(panels)} panels, ids unique")

    rects = []
    grid_ok = True
    for p in panels:
        name = f"panel {p.get('id')} ({p.get('title')!r})"
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in "hwxy"):
            r.fail(f"{name}: gridPos needs integer h, w, x, y: {g!r}")
            grid_ok = False
            continue
        h, w, x, y = g["h"], g["w"], g["x"], g["y"]
        if not (1 <= w <= 24 and 0 <= x and x + w <= 24 and h >= 1 and y >= 0):
            r.fail(f"{name}: gridPos out of the 24-column grid: {g}")
            grid_ok = False
        if p in d.get("panels", []):
            rects.append((name, x, y, w, h))
    for i, (n1, x1, y1, w1, h1) in enumerate(rects):
        for n2, x2, y2, w2, h2 in rects[i + 1:]:
            if x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1:
                r.fail(f"{n1} and {n2} overlap")
                grid_ok = False
    if grid_ok:
        r.ok("gridPos: inside 24 columns, no overlaps")

    ds_ok = True
    n_targets = 0
    for p in panels:
        name = f"panel {p.get('id')} ({p.get('title')!r})"
        if p.get("type") not in PANEL_TYPES:
            r.fail(f"{name}: type {p.get('type')!r} not in {sorted(PANEL_TYPES)}")
        if p.get("datasource") != DS:
            r.fail(f"{name}: datasource {p.get('datasource')!r}, want {DS}")
            ds_ok = False
        targets = p.get("targets") or []
        if p.get("type") != "row" and not targets:
            r.fail(f"{name}: no targets")
        refids = [t.get("refId") for t in targets]
        if len(set(refids)) != len(refids) or None in refids:
            r.fail(f"{name}: refIds missing or repeated: {refids}")
        for t in targets:
            n_targets += 1
            if t.get("datasource") != DS:
                r.fail(f"{name} target {t.get('refId')}: datasource {t.get('datasource')!r}, want {DS}")
                ds_ok = False
            if not (t.get("expr") or "").strip():
                r.fail(f"{name} target {t.get('refId')}: empty expr")
    if ds_ok:
        r.ok(f"every panel and all {n_targets} targets use {json.dumps(DS)}")
    return r


# ---------------------------------------------------------------- eval


def substitute(expr, dashboard):
    """Replaces Grafana variables the way a dashboard showing every instance would."""
    vs = {v.get("name"): v for v in variables(dashboard)}
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        v = vs.get(name)
        if v is None:
            unknown.append(name)
            return m.group(0)
        if v.get("type") == "datasource":
            return m.group(0)
        return v.get("allValue") or ".*"

    return VAR.sub(repl, expr), unknown


def query(prom, expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            return None, f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return None, str(e)
    if body.get("status") != "success":
        return None, f"{body.get('errorType')}: {body.get('error')}"
    return body["data"], None


def scrape_names(path):
    samples, histograms = set(), set()
    with open(path) as f:
        for line in f:
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4 and parts[3] == "histogram":
                    histograms.add(parts[2])
            elif line.strip() and not line.startswith("#"):
                samples.add(re.split(r"[{\s]", line, 1)[0])
    return samples, histograms


def metric_known(name, samples, histograms):
    if name in samples:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return True
    return False


def rule_names(path):
    """Alert and recording rule names in a rules file (no YAML library needed)."""
    with open(path) as f:
        return set(re.findall(r"^\s*-?\s*(?:alert|record):\s*['\"]?([A-Za-z_:][\w:]*)", f.read(), re.M))


def loaded_rules(prom):
    with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10) as resp:
        data = json.load(resp)["data"]
    return [rule for g in data.get("groups", []) for rule in g.get("rules", [])]


def family(name, histograms):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return name


def evaluate(dashboard_path, prom, scrape_path, rules_path=None):
    r = Report()
    with open(dashboard_path) as f:
        d = json.load(f)
    samples, histograms = scrape_names(scrape_path)
    used = set()

    def check_names(where, expr):
        for name in METRIC.findall(expr):
            used.add(name)
            if not metric_known(name, samples, histograms):
                r.fail(f"{where}: metric {name} is not in the scrape")

    checks = []
    for p in all_panels(d):
        for t in p.get("targets") or []:
            checks.append((f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", t.get("expr", ""), True))
    for v in variables(d):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = LABEL_VALUES.match(q or "")
        if m:
            q = f"group by ({m.group(2)}) ({m.group(1)})"
        checks.append((f"variable {v.get('name')!r}", q or "", True))
    rules = []
    if rules_path:
        # The rules as Prometheus loaded them: their health is checked below.
        try:
            rules = loaded_rules(prom)
        except (OSError, ValueError, KeyError) as e:
            r.fail(f"/api/v1/rules: {e}")
        want = rule_names(rules_path)
        missing = want - {rule.get("name") for rule in rules}
        if not want:
            r.fail(f"{rules_path}: no rules found")
        if missing:
            r.fail(f"rules in {rules_path} not loaded by Prometheus: {sorted(missing)}")
        for rule in rules:
            checks.append((f"rule {rule.get('name')}", rule.get("query", ""), False))

    for where, raw, need_data in checks:
        expr, unknown = substitute(raw, d)
        if unknown:
            r.fail(f"{where}: unknown variables {unknown}")
            continue
        check_names(where, expr)
        data, err = query(prom, expr)
        if err:
            r.fail(f"{where}: query error: {err}\n         {expr}")
            continue
        n = len(data.get("result") or [])
        if need_data and n == 0:
            r.fail(f"{where}: no result (a wrong metric or label?)\n         {expr}")
            continue
        r.ok(f"{where}: {n} series")

    if rules:
        bad = [x for x in rules if x.get("health") != "ok" or x.get("lastError")]
        for x in bad:
            r.fail(f"rule {x.get('name')}: health {x.get('health')!r} {x.get('lastError', '')}")
        if not bad:
            r.ok(f"Prometheus evaluated all {len(rules)} rules without error")

    families = {family(s, histograms) for s in samples if s.startswith("veilgate_")}
    unused = sorted(families - {family(u, histograms) for u in used})
    if unused:
        print(f"  info metrics on neither the dashboard nor the alerts: {', '.join(unused)}")
    return r


def main(argv):
    if len(argv) >= 3 and argv[1] == "static":
        r = static(argv[2])
    elif len(argv) in (5, 6) and argv[1] == "eval":
        r = evaluate(argv[2], argv[3].rstrip("/"), argv[4], argv[5] if len(argv) == 6 else None)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if r.errors:
        print(f"  {len(r.errors)} problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
