"""The official `ollama` Python package against a running `zoe-llm serve` (base URL in ZOE_URL).

A plain script, run by tests/serve.rs with the client venv's Python: asserts, exits non-zero on
the first failure, prints one line per check.
"""

import json
import math
import os
import sys

import ollama
from ollama import Client

URL = os.environ["ZOE_URL"].rstrip("/")
MODEL = "smollm2"
client = Client(host=URL, timeout=60)
GREEDY = {"temperature": 0, "num_predict": 16}
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def ok(what):
    print(f"ok: {what}", flush=True)


# Chat, non-streaming and streaming, greedy: the streamed pieces join to the same reply.
chat = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
content = chat.message.content
assert isinstance(content, str) and content.strip(), chat
assert chat.message.role == "assistant", chat
assert chat.done is True and chat.done_reason in ("stop", "length"), chat
assert 0 < chat.eval_count <= 16 and chat.prompt_eval_count > 0, chat
assert chat.total_duration > 0, chat
ok(f"chat: {content!r} ({chat.done_reason}, {chat.eval_count} tokens)")

parts = list(client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=True))
assert parts and parts[-1].done is True, parts[-1:]
assert all(not p.done for p in parts[:-1]), "only the last part is done"
streamed = "".join(p.message.content or "" for p in parts)
assert streamed == content, (streamed, content)
assert parts[-1].done_reason == chat.done_reason and parts[-1].eval_count == chat.eval_count, parts[-1]
ok(f"chat stream: {len(parts)} parts equal the non-streamed reply")

# Generate, raw prompt, greedy.
gen = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 8})
assert isinstance(gen.response, str) and "Paris" in gen.response, gen
assert gen.done is True and gen.done_reason in ("stop", "length"), gen
assert 0 < gen.eval_count <= 8, gen
ok(f"generate (raw): {gen.response!r}")

gen_parts = list(
    client.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 8}, stream=True)
)
assert "".join(p.response for p in gen_parts) == gen.response, gen_parts
assert gen_parts[-1].done and gen_parts[-1].eval_count == gen.eval_count, gen_parts[-1]
ok("generate stream equals the non-streamed text")

# Generate through the chat template (not raw): a reply, and the context to continue from.
templ = client.generate(model=MODEL, prompt="Why is the sky blue?", options=GREEDY)
assert templ.response.strip() and templ.eval_count > 0 and templ.done_reason in ("stop", "length"), templ
assert templ.context and all(isinstance(t, int) for t in templ.context), templ.context
ok(f"generate (templated): {templ.response!r}, context of {len(templ.context)} tokens")

# List / show / ps.
names = [m.model for m in client.list().models]
assert "smollm2:135m" in names, names
ok(f"list: {names}")

show = client.show(MODEL)
assert "completion" in (show.capabilities or []), show.capabilities
assert show.details.family == "llama", show.details
assert show.details.format == "gguf", show.details
assert show.template, "show returns the chat template"
ok(f"show: capabilities {show.capabilities}, family {show.details.family}")

running = [m.model for m in client.ps().models]
assert "smollm2:135m" in running, running
ok(f"ps: {running}")

# Embed: a string and a list, unit-length vectors of 576 dimensions.
one = client.embed(model=MODEL, input="The sky is blue.")
assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 576, len(one.embeddings)
many = client.embed(model=MODEL, input=["The sky is blue.", "Grass is green.", "Snow is white."])
assert len(many.embeddings) == 3, len(many.embeddings)
for v in one.embeddings + many.embeddings:
    assert len(v) == 576, len(v)
    assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3
assert max(abs(a - b) for a, b in zip(one.embeddings[0], many.embeddings[0])) < 1e-4, "same text, same vector"
ok("embed: 1 and 3 inputs, 576 dims, unit norm")

# Structured output: `format` with a JSON schema gives valid JSON for 20 seeds out of 20.
from typing import Literal

import pydantic


class Lamp(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    room: Literal["kitchen", "bedroom", "garden"]
    on: bool
    brightness: int = pydantic.Field(ge=0, le=100)


SCHEMA = Lamp.model_json_schema()
ASK = [{"role": "user", "content": "Turn on the kitchen lamp at half brightness."}]
for seed in range(20):
    r = client.chat(model=MODEL, messages=ASK, format=SCHEMA, options={"seed": seed, "temperature": 1.0, "num_predict": 80})
    assert r.done_reason == "stop", r
    Lamp.model_validate_json(r.message.content)
ok("format with a JSON schema: valid JSON for 20 seeds out of 20")
j = client.generate(model=MODEL, prompt="A JSON object describing a cat:", format="json", options={"seed": 1, "num_predict": 120})
if j.done_reason == "stop":
    assert isinstance(json.loads(j.response), dict), j.response
ok(f"format json: {j.response!r}")

# Tools: the client has no tool_choice parameter, so the request goes through its HTTP client
# with zoe-llm's `tool_choice` extension; the client's own types parse the reply.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_lamp",
            "description": "Switch a lamp in a room",
            "parameters": {
                "type": "object",
                "properties": {
                    "room": {"type": "string", "enum": ["kitchen", "bedroom", "garden"]},
                    "on": {"type": "boolean"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                "required": ["room", "on", "brightness"],
            },
        },
    }
]
body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "stream": False, "options": {"seed": 1}}
resp = ollama.ChatResponse.model_validate(client._client.post("/api/chat", json=body).json())
calls = resp.message.tool_calls
assert calls and calls[0].function.name == "set_lamp", resp
assert isinstance(calls[0].function.arguments, dict), calls
Lamp.model_validate(dict(calls[0].function.arguments))
ok(f"tool_choice required: {calls[0].function.name}({dict(calls[0].function.arguments)})")
with client._client.stream("POST", "/api/chat", json={**body, "stream": True}) as s:
    lines = [ollama.ChatResponse.model_validate_json(l) for l in s.iter_lines() if l]
streamed = [c for l in lines for c in (l.message.tool_calls or [])]
assert len(streamed) == len(calls) and streamed[0].function.arguments == calls[0].function.arguments, (streamed, calls)
assert lines[-1].done and lines[-1].done_reason == "stop", lines[-1]
ok("streamed: the call arrives whole in one line")

# The client's own tools= parameter (auto): the tool result goes back with tool_name.
auto = client.chat(model=MODEL, messages=ASK, tools=TOOLS, options={"seed": 2, "num_predict": 60})
assert auto.done, auto
history = ASK + [{"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]}]
history.append({"role": "tool", "content": "done", "tool_name": "set_lamp"})
after = client.chat(model=MODEL, messages=history, tools=TOOLS, options={"temperature": 0, "num_predict": 16})
assert after.done, after
ok(f"tools auto: {len(auto.message.tool_calls or [])} calls; tool result round trip")

# An unknown model is a ResponseError with status 404.
try:
    client.chat(model="no-such-model", messages=MESSAGES)
except ollama.ResponseError as e:
    assert e.status_code == 404, (e.status_code, e.error)
    assert "not found" in e.error, e.error
    ok(f"unknown model: {e.status_code} {e.error}")
else:
    sys.exit("an unknown model did not raise ResponseError")

print("all ollama checks passed")
