//! OpenAI's SSE streams: chat chunks and text-completion chunks share one writer
//! ([`SseStream`]) that handles the per-choice opening, empty pieces, one finish per choice, the
//! usage chunk and `data: [DONE]`; a [`ChunkKind`] supplies what differs.

use serde::Serialize;

use super::error::{ApiError, Dialect};
use super::infer::StreamWriter;
use super::openai::{
    chat_logprobs, legacy_logprobs, sse, tool_call_id, usage, ChatCompletionChunk, ChunkChoice, Completion,
    CompletionChoice, Delta, FunctionDelta, ToolCallDelta, Usage,
};
use crate::chat::tools::{Segment, ToolStream};
use crate::engine::generate::TokenLogprobs;
use crate::engine::service::{Event, ModelHandle, Summary};

/// What the chat and text-completion streams write differently; [`SseStream`] does the rest
/// (one opening per choice, skipping empty pieces, one finish per choice, the usage chunk,
/// `[DONE]`, errors).
pub(super) trait ChunkKind: Send + 'static {
    type Choice;
    type Chunk: Serialize;
    /// Written before the first piece of choice `index` (chat: the role delta; text: the echo).
    fn opening(&mut self, index: usize) -> Option<Self::Choice>;
    /// The chunks for one generated piece (chat with tools: content and tool-call deltas, or
    /// nothing while a possible call is undecided).
    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> Vec<Self::Choice>;
    /// The last chunks of choice `index`, the one with `finish_reason` last.
    fn finish(&mut self, index: usize, s: &Summary) -> Vec<Self::Choice>;
    fn chunk(&self, choices: Vec<Self::Choice>, usage: Option<Usage>) -> Self::Chunk;
    fn logprobs(&self) -> bool;
}

pub(super) struct SseStream<K: ChunkKind> {
    kind: K,
    opened: Vec<bool>,
    finished: Vec<Option<Summary>>,
    include_usage: bool,
    prompt_tokens: usize,
}

impl<K: ChunkKind> SseStream<K> {
    pub(super) fn new(kind: K, n: usize, include_usage: bool, prompt_tokens: usize) -> Self {
        Self { kind, opened: vec![false; n], finished: vec![None; n], include_usage, prompt_tokens }
    }
}

impl<K: ChunkKind> StreamWriter for SseStream<K> {
    fn event(&mut self, index: usize, event: Event, out: &mut Vec<u8>) -> bool {
        if !std::mem::replace(&mut self.opened[index], true) {
            if let Some(c) = self.kind.opening(index) {
                sse(out, &self.kind.chunk(vec![c], None));
            }
        }
        match event {
            Event::Token { text, token, logprobs } => {
                let lps: Vec<(u32, TokenLogprobs)> = token.zip(logprobs).into_iter().collect();
                if !text.is_empty() || (self.kind.logprobs() && !lps.is_empty()) {
                    for c in self.kind.piece(index, text, &lps) {
                        sse(out, &self.kind.chunk(vec![c], None));
                    }
                }
                false
            }
            Event::Done(s) => {
                for c in self.kind.finish(index, &s) {
                    sse(out, &self.kind.chunk(vec![c], None));
                }
                self.finished[index] = Some(s);
                if !self.finished.iter().all(Option::is_some) {
                    return false;
                }
                if self.include_usage {
                    let all: Vec<&Summary> = self.finished.iter().flatten().collect();
                    sse(out, &self.kind.chunk(Vec::new(), Some(usage(self.prompt_tokens, &all))));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                true
            }
            Event::Error(e) => {
                self.abort(&e, out);
                true
            }
        }
    }

    fn abort(&mut self, message: &str, out: &mut Vec<u8>) {
        sse(out, &ApiError::Internal(message.to_owned()).body(Dialect::OpenAi));
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

pub(super) struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    handle: std::sync::Arc<ModelHandle>,
    logprobs: bool,
    /// Per choice, when tools are in play: the extractor, and how many calls it has found.
    tools: Option<Vec<(Option<ToolStream>, usize)>>,
}

impl ChatChunks {
    pub(super) fn new(
        id: String,
        created: u64,
        model: String,
        handle: std::sync::Arc<ModelHandle>,
        logprobs: bool,
        n: usize,
        tool_calls: bool,
    ) -> Self {
        let tools = tool_calls.then(|| (0..n).map(|_| (Some(ToolStream::default()), 0)).collect());
        Self { id, created, model, handle, logprobs, tools }
    }

    fn choice(index: usize, delta: Delta) -> ChunkChoice {
        ChunkChoice { index, delta, logprobs: None, finish_reason: None, stop_reason: None }
    }

    /// Content deltas for text; for each call, its header (`id`, `type`, name, empty
    /// arguments) and then its arguments, as OpenAI streams them.
    fn segments(&mut self, index: usize, segments: Vec<Segment>) -> Vec<ChunkChoice> {
        let calls = &mut self.tools.as_mut().expect("segments come from the tool extractor")[index].1;
        let mut out = Vec::new();
        for seg in segments {
            match seg {
                Segment::Text(t) => out.push(Self::choice(index, Delta { content: Some(t), ..Delta::default() })),
                Segment::Call(call) => {
                    let k = *calls;
                    *calls += 1;
                    let header = ToolCallDelta {
                        index: k,
                        id: Some(tool_call_id()),
                        kind: Some("function"),
                        function: FunctionDelta { name: Some(call.name.clone()), arguments: Some(String::new()) },
                    };
                    let args = ToolCallDelta {
                        index: k,
                        id: None,
                        kind: None,
                        function: FunctionDelta { name: None, arguments: Some(call.arguments_json()) },
                    };
                    for d in [header, args] {
                        out.push(Self::choice(index, Delta { tool_calls: Some(vec![d]), ..Delta::default() }));
                    }
                }
            }
        }
        out
    }
}

impl ChunkKind for ChatChunks {
    type Choice = ChunkChoice;
    type Chunk = ChatCompletionChunk;

    fn opening(&mut self, index: usize) -> Option<ChunkChoice> {
        Some(Self::choice(index, Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None }))
    }

    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> Vec<ChunkChoice> {
        let mut out = match &mut self.tools {
            None => vec![Self::choice(index, Delta { content: Some(text), ..Delta::default() })],
            Some(streams) => {
                let segments = streams[index].0.as_mut().expect("no pieces after the finish").push(&text);
                self.segments(index, segments)
            }
        };
        if self.logprobs {
            // The token's log-probabilities ride on its first chunk (an empty delta when the
            // extractor is still holding its text).
            if out.is_empty() {
                out.push(Self::choice(index, Delta::default()));
            }
            out[0].logprobs = Some(chat_logprobs(&self.handle, lps));
        }
        out
    }

    fn finish(&mut self, index: usize, s: &Summary) -> Vec<ChunkChoice> {
        let (mut out, calls) = match &mut self.tools {
            None => (Vec::new(), 0),
            Some(streams) => {
                let rest = streams[index].0.take().map(ToolStream::finish).unwrap_or_default();
                let out = self.segments(index, rest);
                (out, self.tools.as_ref().expect("matched")[index].1)
            }
        };
        let finish_reason = if calls > 0 { "tool_calls" } else { s.finish_reason.as_str() };
        out.push(ChunkChoice {
            finish_reason: Some(finish_reason),
            stop_reason: s.stop_reason.clone(),
            ..Self::choice(index, Delta::default())
        });
        out
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn logprobs(&self) -> bool {
        self.logprobs
    }
}

pub(super) struct TextChunks {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) handle: std::sync::Arc<ModelHandle>,
    pub(super) echo: Option<String>,
    /// Per choice: text bytes written so far (legacy logprobs' `text_offset`).
    pub(super) offsets: Vec<usize>,
    pub(super) logprobs: bool,
}

impl ChunkKind for TextChunks {
    type Choice = CompletionChoice;
    type Chunk = Completion;

    fn opening(&mut self, index: usize) -> Option<CompletionChoice> {
        let text = self.echo.clone().filter(|p| !p.is_empty())?;
        self.offsets[index] = text.len();
        Some(CompletionChoice { index, text, logprobs: None, finish_reason: None, stop_reason: None })
    }

    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> Vec<CompletionChoice> {
        let logprobs = self.logprobs.then(|| legacy_logprobs(&self.handle, lps, self.offsets[index]));
        self.offsets[index] += text.len();
        vec![CompletionChoice { index, text, logprobs, finish_reason: None, stop_reason: None }]
    }

    fn finish(&mut self, index: usize, s: &Summary) -> Vec<CompletionChoice> {
        vec![CompletionChoice {
            index,
            text: String::new(),
            logprobs: None,
            finish_reason: Some(s.finish_reason.as_str()),
            stop_reason: s.stop_reason.clone(),
        }]
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn logprobs(&self) -> bool {
        self.logprobs
    }
}
