#!/usr/bin/env python3
"""Time to first token of the first request after `zoe-llm serve` starts, with warm-up off and on.

usage: scripts/bench-first-request.py ZOE_LLM_BINARY [--starts 3] [--port 11610] [--raw]

Each round starts `serve` with a config of `warmup = false|true`, waits for `GET /`, sends two
greedy `/api/generate` requests (a cat story, then a dog story: different prompts) and stops the
server. It prints the client's time to the first NDJSON line and the server's own
`prompt_eval_duration` for both. Standard library only.
"""
import argparse
import json
import subprocess
import tempfile
import time
import urllib.request


def first_token(url, animal, raw):
    if raw:
        prompt = f"{animal.title()}s are wonderful animals, and here is a short story about one {animal}."
    else:
        prompt = f"Tell me a short story about a {animal}."
    body = json.dumps({"model": "smollm2", "prompt": prompt, "raw": raw,
                       "options": {"temperature": 0, "num_predict": 8}}).encode()
    req = urllib.request.Request(url + "/api/generate", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        last = json.loads(r.readline())
        ttft = time.perf_counter() - start
        for line in r:
            last = json.loads(line)
    return ttft * 1000, last["prompt_eval_duration"] / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--port", type=int, default=11610)
    ap.add_argument("--raw", action="store_true")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for warm in ["false", "true"] * args.starts:
            cfg = f"{d}/warm-{warm}.toml"
            with open(cfg, "w") as f:
                f.write(f"warmup = {warm}\nport = {args.port}\n")
            p = subprocess.Popen([args.binary, "serve", "--config", cfg, "--log", "warn"], stderr=subprocess.DEVNULL)
            try:
                for _ in range(600):
                    try:
                        urllib.request.urlopen(url + "/")
                        break
                    except OSError:
                        time.sleep(0.05)
                a = first_token(url, "cat", args.raw)
                b = first_token(url, "dog", args.raw)
                results.setdefault(warm, []).append((a, b))
            finally:
                p.terminate()
                p.wait()
    for warm, runs in results.items():
        for (t1, p1), (t2, p2) in runs:
            print(f"warmup={warm}: first {t1:.1f} ms (prefill {p1:.1f}), second {t2:.1f} ms (prefill {p2:.1f})")


if __name__ == "__main__":
    main()
