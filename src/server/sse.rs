//! OpenAI's SSE streams: chat chunks and text-completion chunks share one writer
//! ([`SseStream`]) that handles the per-choice opening, empty pieces, one finish per choice, the
//! usage chunk and `data: [DONE]`; a [`ChunkKind`] supplies what differs.

use serde::Serialize;

use super::error::{ApiError, Dialect};
use super::infer::StreamWriter;
use super::openai::{
    chat_logprobs, legacy_logprobs, sse, usage, ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice, Delta,
    Usage,
};
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
    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> Self::Choice;
    fn finish(&mut self, index: usize, s: &Summary) -> Self::Choice;
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
                    let c = self.kind.piece(index, text, &lps);
                    sse(out, &self.kind.chunk(vec![c], None));
                }
                false
            }
            Event::Done(s) => {
                let c = self.kind.finish(index, &s);
                sse(out, &self.kind.chunk(vec![c], None));
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
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) handle: std::sync::Arc<ModelHandle>,
    pub(super) logprobs: bool,
}

impl ChunkKind for ChatChunks {
    type Choice = ChunkChoice;
    type Chunk = ChatCompletionChunk;

    fn opening(&mut self, index: usize) -> Option<ChunkChoice> {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
        Some(ChunkChoice { index, delta, logprobs: None, finish_reason: None, stop_reason: None })
    }

    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> ChunkChoice {
        ChunkChoice {
            index,
            delta: Delta { role: None, content: Some(text) },
            logprobs: self.logprobs.then(|| chat_logprobs(&self.handle, lps)),
            finish_reason: None,
            stop_reason: None,
        }
    }

    fn finish(&mut self, index: usize, s: &Summary) -> ChunkChoice {
        ChunkChoice {
            index,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(s.finish_reason.as_str()),
            stop_reason: s.stop_reason.clone(),
        }
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

    fn piece(&mut self, index: usize, text: String, lps: &[(u32, TokenLogprobs)]) -> CompletionChoice {
        let logprobs = self.logprobs.then(|| legacy_logprobs(&self.handle, lps, self.offsets[index]));
        self.offsets[index] += text.len();
        CompletionChoice { index, text, logprobs, finish_reason: None, stop_reason: None }
    }

    fn finish(&mut self, index: usize, s: &Summary) -> CompletionChoice {
        CompletionChoice {
            index,
            text: String::new(),
            logprobs: None,
            finish_reason: Some(s.finish_reason.as_str()),
            stop_reason: s.stop_reason.clone(),
        }
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
