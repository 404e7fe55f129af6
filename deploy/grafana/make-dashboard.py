#!/usr/bin/env python3
"""Writes zoe-llm.json, the Grafana dashboard over zoe-llm's /metrics (src/server/metrics.rs).

    python3 deploy/grafana/make-dashboard.py > deploy/grafana/zoe-llm.json

The JSON is committed; this script is how it was made (edit here, regenerate, commit both).
tests/deploy.rs checks that every metric the server exports appears in the dashboard and that
the dashboard asks for no metric the server does not export.
"""
import json
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model", instance=~"$instance"'
I = 'instance=~"$instance"'
U = 'upstream=~"$upstream", instance=~"$instance"'
RI = "$__rate_interval"

panels = []
_id = [0]
_y = [0]


def nid():
    _id[0] += 1
    return _id[0]


def row(title):
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


def layout(items, h):
    """Places panels side by side on one line: items = [(width, panel), ...]."""
    x = 0
    for w, p in items:
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": _y[0]}
        x += w
        panels.append(p)
    _y[0] += h


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title, targets, unit="short", desc="", stack=False, minv=0, maxv=None):
    p = {
        "type": "timeseries", "title": title, "id": nid(), "datasource": DS, "description": desc,
        "targets": [target(e, l, chr(65 + i)) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit, "min": minv,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                           "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }
    if maxv is not None:
        p["fieldConfig"]["defaults"]["max"] = maxv
    return p


def stat(title, expr, unit="short", desc="", thresholds=None, mappings=None):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
        "targets": [target(expr, "", "A")],
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "auto",
                    "justifyMode": "auto", "orientation": "auto"},
    }


def quantiles(metric, by="model_name"):
    return [
        (f'histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{M}}}[{RI}])))',
         f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.9, 0.99)
    ] + [(f"sum by ({by}) (rate({metric}_sum{{{M}}}[{RI}])) / sum by ({by}) (rate({metric}_count{{{M}}}[{RI}]))",
          f"mean {{{{{by}}}}}")]


RED_GREEN = [{"color": "red", "value": None}, {"color": "green", "value": 1}]

row("Overview")
layout([
    (4, stat("Engines alive", f"sum(zoe_engine_alive{{{M}}})", desc="zoe_engine_alive: 1 per engine that is ready and beating.",
             thresholds=RED_GREEN)),
    (4, stat("Models resident", f"sum(zoe_model_resident{{{M}}})", desc="zoe_model_resident: models loaded now, out of those in the store.")),
    (4, stat("Memory used / budget", f"sum(zoe_memory_used_bytes{{{I}}}) / sum(zoe_memory_budget_bytes{{{I}}})", unit="percentunit",
             thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.85}, {"color": "red", "value": 0.95}])),
    (4, stat("Requests running", f"sum(vllm:num_requests_running{{{M}}})")),
    (4, stat("Requests waiting", f"sum(vllm:num_requests_waiting{{{M}}})",
             thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 8}, {"color": "red", "value": 32}])),
    (4, stat("Upstreams up", f"sum(zoe_upstream_up{{{U}}}) / count(zoe_upstream_up{{{U}}})", unit="percentunit",
             desc="Share of upstreams whose circuit breaker is closed (no data: no upstreams configured).",
             thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0.5}, {"color": "green", "value": 1}])),
], 4)

row("Latency")
layout([
    (8, timeseries("Time to first token", quantiles("vllm:time_to_first_token_seconds"), unit="s",
                   desc="vllm:time_to_first_token_seconds: arrival to first token (queueing and prefill).")),
    (8, timeseries("Time per output token", quantiles("vllm:time_per_output_token_seconds"), unit="s",
                   desc="vllm:time_per_output_token_seconds: mean time per token after the first, per request.")),
    (8, timeseries("End-to-end request latency", quantiles("vllm:e2e_request_latency_seconds"), unit="s",
                   desc="vllm:e2e_request_latency_seconds: arrival to the end of the request.")),
], 8)

row("Throughput")
layout([
    (8, timeseries("Tokens per second", [
        (f"sum by (model_name) (rate(vllm:generation_tokens_total{{{M}}}[{RI}]))", "generated {{model_name}}"),
        (f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{M}}}[{RI}]))", "prompt {{model_name}}"),
    ], unit="tps")),
    (8, timeseries("Finished requests by reason", [
        (f"sum by (model_name, finished_reason) (rate(vllm:request_success_total{{{M}}}[{RI}]))",
         "{{finished_reason}} {{model_name}}"),
    ], unit="reqps", stack=True, desc="stop, length (token limit), abort (client left).")),
    (8, timeseries("Requests running and waiting", [
        (f"sum by (model_name) (vllm:num_requests_running{{{M}}})", "running {{model_name}}"),
        (f"sum by (model_name) (vllm:num_requests_waiting{{{M}}})", "waiting {{model_name}}"),
    ])),
], 8)

row("KV cache")
layout([
    (8, timeseries("KV cache usage", [
        (f"max by (model_name) (vllm:kv_cache_usage_perc{{{M}}})", "{{model_name}}"),
        (f"max by (model_name) (vllm:gpu_cache_usage_perc{{{M}}})", "{{model_name}} (gpu_cache_usage_perc)"),
    ], unit="percentunit", maxv=1, desc="Fraction of the model's KV-cache blocks in use; vllm:gpu_cache_usage_perc is the same value under vLLM's older name.")),
    (8, timeseries("Prefix cache hit rate", [
        (f"sum by (model_name) (rate(vllm:prefix_cache_hits_total{{{M}}}[{RI}])) / sum by (model_name) (rate(vllm:prefix_cache_queries_total{{{M}}}[{RI}]))",
         "{{model_name}}"),
    ], unit="percentunit", maxv=1, desc="Prompt tokens found in the prefix cache / prompt tokens looked up.")),
    (8, timeseries("Preemptions and KV blocks", [
        (f"sum by (model_name) (rate(vllm:num_preemptions_total{{{M}}}[{RI}]))", "preemptions/s {{model_name}}"),
        (f"max by (model_name) (zoe_kv_cache_blocks{{{M}}})", "blocks {{model_name}}"),
    ], desc="Sequences preempted (recomputed later) when KV blocks ran out; the pool's size in blocks.")),
], 8)

row("Engines")
layout([
    (8, timeseries("Engine alive", [
        (f"max by (model_name) (zoe_engine_alive{{{M}}})", "{{model_name}}"),
    ], maxv=1, desc="1 while the engine is ready and beating. 0 for a pinned model: /health is 503 and the systemd watchdog is no longer fed.")),
    (8, timeseries("Restarts, errors, retries", [
        (f"sum by (model_name) (increase(zoe_engine_restarts_total{{{M}}}[{RI}]))", "restarts {{model_name}}"),
        (f"sum by (model_name) (increase(zoe_engine_errors_total{{{M}}}[{RI}]))", "errors {{model_name}}"),
        (f"sum by (model_name) (increase(zoe_engine_retries_total{{{M}}}[{RI}]))", "retries {{model_name}}"),
    ], desc="Supervisor restarts, generations that ended with an error, requests retried transparently after an engine failure.")),
    (8, timeseries("Heartbeat age", [
        (f"max by (model_name) (zoe_engine_heartbeat_age_seconds{{{M}}})", "{{model_name}}"),
    ], unit="s", desc="Seconds since the engine loop last beat; beyond stall_timeout (30 s) the engine is stalled.")),
], 8)

row("Memory and models")
layout([
    (8, timeseries("Memory used vs budget", [
        (f"sum(zoe_memory_used_bytes{{{I}}})", "used"),
        (f"sum(zoe_memory_budget_bytes{{{I}}})", "budget"),
    ], unit="bytes")),
    (8, timeseries("Bytes per resident model", [
        (f"sum by (model_name) (zoe_model_size_bytes{{{M}}})", "{{model_name}}"),
    ], unit="bytes", stack=True, desc="Weights and KV cache of each resident model.")),
    (8, timeseries("Resident models and load time", [
        (f"max by (model_name) (zoe_model_resident{{{M}}})", "resident {{model_name}}"),
        (f"max by (model_name) (zoe_model_load_seconds{{{M}}})", "load s {{model_name}}"),
    ], desc="zoe_model_resident: 1 loaded, 0 in the store only. zoe_model_load_seconds: load and warm-up.")),
], 8)

row("Vision")
layout([
    (8, timeseries("Image cache hit rate", [
        (f"sum by (model_name) (rate(zoe_vision_cache_hits_total{{{M}}}[{RI}])) / (sum by (model_name) (rate(zoe_vision_cache_hits_total{{{M}}}[{RI}])) + sum by (model_name) (rate(zoe_vision_cache_misses_total{{{M}}}[{RI}])))",
         "{{model_name}}"),
    ], unit="percentunit", maxv=1, desc="Images whose vision-tower output was cached (clients resend every image with every turn) / images in requests.")),
    (8, timeseries("Image cache size", [
        (f"max by (model_name) (zoe_vision_cache_bytes{{{M}}})", "bytes {{model_name}}"),
        (f"max by (model_name) (zoe_vision_cache_entries{{{M}}})", "images {{model_name}}"),
    ], desc="Tower output the cache holds (64 MiB at most per model).")),
    (8, timeseries("Images being encoded", [
        (f"sum by (model_name) (zoe_vision_encoding{{{M}}})", "{{model_name}}"),
    ], desc="Vision-tower runs in progress.")),
], 8)

row("Upstreams")
layout([
    (8, timeseries("Upstream up", [
        (f"max by (upstream) (zoe_upstream_up{{{U}}})", "{{upstream}}"),
    ], maxv=1, desc="1 while the upstream's circuit breaker is closed.")),
    (8, timeseries("Upstream requests and failures", [
        (f"sum by (upstream) (rate(zoe_upstream_requests_total{{{U}}}[{RI}]))", "answered {{upstream}}"),
        (f"sum by (upstream) (rate(zoe_upstream_failures_total{{{U}}}[{RI}]))", "failed attempts {{upstream}}"),
        (f"sum by (upstream) (rate(zoe_upstream_skipped_total{{{U}}}[{RI}]))", "skipped (breaker open) {{upstream}}"),
    ], unit="reqps")),
    (8, timeseries("Breaker openings", [
        (f"sum by (upstream) (increase(zoe_upstream_breaker_opened_total{{{U}}}[{RI}]))", "{{upstream}}"),
    ])),
], 8)


def query_var(name, label, query, include_all=True):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2, "includeAll": include_all, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "sort": 1, "hide": 0, "regex": "",
    }


dashboard = {
    "title": "zoe-llm",
    "uid": "zoe-llm",
    "description": "zoe-llm serve: vLLM-named request metrics per model, engines, memory, upstreams (src/server/metrics.rs).",
    "tags": ["zoe-llm", "llm", "vllm"],
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "timepicker": {},
    "timezone": "",
    "links": [],
    "annotations": {"list": [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
        "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
    }]},
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": ""},
        query_var("instance", "Instance", "label_values(zoe_memory_budget_bytes, instance)"),
        query_var("model", "Model", 'label_values(zoe_model_resident{instance=~"$instance"}, model_name)'),
        query_var("upstream", "Upstream", 'label_values(zoe_upstream_up{instance=~"$instance"}, upstream)'),
    ]},
    "panels": panels,
}

json.dump(dashboard, sys.stdout, indent=2)
sys.stdout.write("\n")
