#!/usr/bin/env python3
"""Aggregate decode throughput and time to first token of N concurrent streams against a running
`zoe-llm serve` (Ollama /api/generate, raw prompts, greedy, num_predict tokens each).

usage: scripts/bench-concurrency.py URL MODEL [--streams 1,8] [--tokens 128] [--reps 3]
Standard library only. Aggregate t/s = all generated tokens / wall time from the first request
sent to the last done line. TTFT is per request: send to first streamed line.
"""
import argparse, json, statistics, threading, time, urllib.request


def one(url, model, i, tokens, out):
    body = json.dumps({"model": model, "prompt": f"{i}, {i + 1}, {i + 2}, {i + 3},", "raw": True,
                       "options": {"temperature": 0, "repeat_penalty": 1, "num_predict": tokens}}).encode()
    req = urllib.request.Request(url + "/api/generate", data=body, method="POST")
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if first is None:
                first = time.perf_counter()
            d = json.loads(line)
            if d.get("done"):
                out[i] = (first - t0, d.get("eval_count", 0), d.get("done_reason"))


def run(url, model, n, tokens):
    out = [None] * n
    threads = [threading.Thread(target=one, args=(url, model, i, tokens, out)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(o[1] for o in out) / wall, [o[0] for o in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
    run(a.url, a.model, 1, 8)  # warm-up
    base = None
    print("| streams | aggregate t/s | TTFT p50 ms | TTFT p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for n in [int(x) for x in a.streams.split(",")]:
        rates, ttfts = [], []
        for _ in range(a.reps):
            r, t = run(a.url, a.model, n, a.tokens)
            rates.append(r)
            ttfts += t
        ttfts.sort()
        p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1000
        rate = statistics.mean(rates)
        base = base or rate
        print(f"| {n} | {rate:.1f} ± {statistics.pstdev(rates):.1f} ({rate / base:.2f}x) | {p(0.5):.0f} | {p(0.99):.0f} |")


if __name__ == "__main__":
    main()
