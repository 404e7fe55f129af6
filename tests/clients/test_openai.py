"""The official `openai` Python package against a running `zoe-llm serve` (base URL in ZOE_URL).

A plain script, run by tests/serve.rs with the client venv's Python: asserts, exits non-zero on
the first failure, prints one line per check.
"""

import json
import math
import os
import sys

import openai
from openai import OpenAI

URL = os.environ["ZOE_URL"].rstrip("/")
MODEL = "smollm2"
client = OpenAI(base_url=URL + "/v1", api_key="x", max_retries=0, timeout=60)
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def ok(what):
    print(f"ok: {what}", flush=True)


# Chat, non-streaming, greedy.
chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16)
assert len(chat.choices) == 1, chat
choice = chat.choices[0]
content = choice.message.content
assert isinstance(content, str) and content.strip(), chat
assert choice.message.role == "assistant", chat
assert choice.finish_reason in ("stop", "length"), chat
assert chat.object == "chat.completion", chat
assert chat.id, chat
u = chat.usage
assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16, u
assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
if choice.finish_reason == "length":
    assert u.completion_tokens == 16, u
ok(f"chat: {content!r} ({choice.finish_reason}, {u.completion_tokens} tokens)")

# Chat, streaming, same greedy request: the deltas join to the same text, one finish_reason, and
# the usage chunk (choices == []) comes last when asked for.
stream = client.chat.completions.create(
    model=MODEL,
    messages=MESSAGES,
    temperature=0,
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finishes, usage, ids = [], [], None, set()
for chunk in stream:
    ids.add(chunk.id)
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        assert chunk.choices == [], chunk
        usage = chunk.usage
        continue
    assert usage is None, "no chunk may follow the usage chunk"
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason is not None:
            finishes.append(c.finish_reason)
streamed = "".join(pieces)
assert streamed == content, (streamed, content)
assert finishes == [choice.finish_reason], finishes
assert len(ids) == 1, ids
assert usage is not None and usage.completion_tokens == u.completion_tokens, usage
assert usage.prompt_tokens == u.prompt_tokens, usage
ok(f"chat stream: {len(pieces)} deltas equal the non-streamed reply")

# Completions (raw prompt), greedy.
comp = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
assert comp.object == "text_completion", comp
text = comp.choices[0].text
assert isinstance(text, str) and text.strip(), comp
assert comp.choices[0].finish_reason in ("stop", "length"), comp
assert 0 < comp.usage.completion_tokens <= 8, comp.usage
assert "Paris" in text, text
comp2 = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
assert comp2.choices[0].text == text, (comp2.choices[0].text, text)
ok(f"completion: {text!r}")

# Streamed completion joins to the same text.
joined = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
    )
    if c.choices
)
assert joined == text, (joined, text)
ok("completion stream equals the non-streamed text")

# Models.
ids = [m.id for m in client.models.list()]
assert "smollm2:135m" in ids, ids
m = client.models.retrieve("smollm2:135m")
assert m.id == "smollm2:135m" and m.object == "model", m
ok(f"models: {ids}")

# Embeddings: 576 dimensions (SmolLM2-135M's hidden size), unit length, one per input.
emb = client.embeddings.create(model=MODEL, input=["The sky is blue.", "Grass is green."])
assert len(emb.data) == 2, emb
for i, d in enumerate(emb.data):
    assert d.index == i, d
    assert len(d.embedding) == 576, len(d.embedding)
    norm = math.sqrt(sum(x * x for x in d.embedding))
    assert abs(norm - 1.0) < 1e-3, norm
assert emb.data[0].embedding != emb.data[1].embedding
assert emb.usage.prompt_tokens > 0, emb.usage
ok("embeddings: 2 x 576, unit norm")


# Tools: tool_choice "required" with a three-field schema gives a schema-valid call, which the
# client parses into message.tool_calls; streamed, the deltas join to the same call.
from typing import Literal

import pydantic


class Lamp(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    room: Literal["kitchen", "bedroom", "garden"]
    on: bool
    brightness: int = pydantic.Field(ge=0, le=100)


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
                "additionalProperties": False,
            },
        },
    }
]
ASK = [{"role": "user", "content": "Turn on the kitchen lamp at half brightness."}]
tc = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=1, max_tokens=80)
call = tc.choices[0].message.tool_calls[0]
assert tc.choices[0].finish_reason == "tool_calls", tc
assert call.type == "function" and call.function.name == "set_lamp" and call.id, call
lamp = Lamp.model_validate_json(call.function.arguments)
ok(f"tool_choice required: {call.function.name}({call.function.arguments}) -> {lamp!r}")

stream = client.chat.completions.create(
    model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=1, max_tokens=80, stream=True
)
names, args, finish = {}, {}, None
for chunk in stream:
    for d in chunk.choices[0].delta.tool_calls or []:
        if d.function.name:
            names[d.index] = d.function.name
        args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
    finish = chunk.choices[0].finish_reason or finish
calls = tc.choices[0].message.tool_calls
assert finish == "tool_calls" and names == {i: c.function.name for i, c in enumerate(calls)}, (finish, names, calls)
assert [json.loads(args[i]) for i in range(len(calls))] == [json.loads(c.function.arguments) for c in calls], args
ok("streamed tool-call deltas join to the same call")

# A named tool, and the tool result sent back (arguments as the client's JSON string).
named = {"type": "function", "function": {"name": "set_lamp"}}
nc = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, seed=2, max_tokens=80)
call = nc.choices[0].message.tool_calls[0]
Lamp.model_validate_json(call.function.arguments)
follow = client.chat.completions.create(
    model=MODEL,
    messages=ASK
    + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "done"},
    ],
    tools=TOOLS,
    max_tokens=16,
    temperature=0,
)
assert follow.choices[0].message.content is not None or follow.choices[0].message.tool_calls, follow
ok("named tool call, then the tool result round trip")

# Structured output through the client's own parse helper (json_schema, strict).
parsed = client.chat.completions.parse(
    model=MODEL, messages=[{"role": "user", "content": "Describe a lamp."}], response_format=Lamp, seed=3, max_tokens=80
)
assert isinstance(parsed.choices[0].message.parsed, Lamp), parsed
ok(f"response_format json_schema: {parsed.choices[0].message.parsed!r}")
jo = client.chat.completions.create(
    model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=4, max_tokens=120
)
if jo.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(jo.choices[0].message.content), dict), jo
ok(f"response_format json_object: {jo.choices[0].message.content!r}")

# An unknown model is a 404 the client turns into NotFoundError.
try:
    client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
except openai.NotFoundError as e:
    assert e.status_code == 404, e
    assert "does not exist" in str(e), str(e)
    ok(f"unknown model: {e}")
else:
    sys.exit("an unknown model did not raise NotFoundError")

print("all openai checks passed")
