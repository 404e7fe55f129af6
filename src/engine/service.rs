//! A loaded model behind a queue: one engine thread owns the weights and works through jobs in
//! arrival order; the HTTP handlers talk to it through a [`ModelHandle`].
//!
//! This is the single-sequence engine serving concurrent clients: jobs wait in a bounded queue
//! (full → [`SubmitError::Busy`], which the API turns into 503) and run one at a time. The
//! engine-core issue replaces the thread's loop with continuous batching over a paged KV cache;
//! the handle, the job types and the event stream stay.
//!
//! Cancellation: a generation job streams [`Event`]s into a channel whose receiver is the HTTP
//! response. When the client goes away the response is dropped, the channel closes, and the
//! engine sees it at its next token and stops before the next forward pass. A job whose
//! receiver is already gone when its turn comes is skipped.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::backend::cpu::CpuBackend;
use crate::engine::generate::{generate, FinishReason, GenerateRequest, TokenLogprobs};
use crate::model::kv_cache::ContiguousKvCache;
use crate::model::llama::Llama;
use crate::model::loaded::LoadedModel;
use crate::model::tokenizer::Tokenizer;

/// One streamed step of a generation.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token (`token: Some`) or the final flush of held-back text (`None`). `text`
    /// may be empty.
    Token { text: String, token: Option<u32>, logprobs: Option<TokenLogprobs> },
    /// The last event of a successful generation.
    Done(Summary),
    /// The generation failed; no event follows.
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    pub stop_reason: Option<String>,
    pub prompt_tokens: usize,
    /// Generated ids (no end-of-generation token).
    pub tokens: Vec<u32>,
    /// Time spent waiting in the queue.
    pub queue: Duration,
    /// Prefill and first sample.
    pub prompt_eval: Duration,
    /// Every later forward and sample.
    pub eval: Duration,
}

/// A generation event tagged with the choice it belongs to (OpenAI `n`).
pub type Tagged = (usize, Event);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    Busy,
    #[error("the engine for this model has stopped")]
    Stopped,
}

enum Job {
    Generate { req: GenerateRequest, context_len: usize, index: usize, events: mpsc::UnboundedSender<Tagged> },
    Embed { inputs: Vec<Vec<u32>>, reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>> },
}

/// Counters the engine keeps per model (the metrics endpoint reads them).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub finished_abort: AtomicU64,
    pub errors: AtomicU64,
}

/// A model the server can use: its tokenizer and limits for request preparation, and the queue
/// into its engine thread. Dropping the last handle closes the queue; the thread finishes the job
/// at hand and exits.
pub struct ModelHandle {
    pub id: String,
    pub tokenizer: Arc<Tokenizer>,
    pub context_length: usize,
    /// Tokens the sampler may choose: the smaller of tokenizer and head vocabularies.
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Bytes of weights this model holds.
    pub size_bytes: u64,
    pub loaded_at: std::time::SystemTime,
    pub load_duration: Duration,
    pub stats: Arc<EngineStats>,
    queue: Option<SyncSender<(Job, Instant, tracing::Span)>>,
    thread: Option<JoinHandle<()>>,
}

impl ModelHandle {
    /// Starts the engine thread for `loaded` with room for `max_queue` waiting jobs.
    pub fn start(loaded: LoadedModel<CpuBackend>, size_bytes: u64, load_duration: Duration, max_queue: usize) -> Self {
        let LoadedModel { id, backend, model, tokenizer, context_length } = loaded;
        let tokenizer = Arc::new(tokenizer);
        let vocab_size = tokenizer.vocab_size().min(model.config.vocab_size);
        let hidden_size = model.config.hidden_size;
        let stats = Arc::new(EngineStats::default());
        let (tx, rx) = sync_channel::<(Job, Instant, tracing::Span)>(max_queue.max(1));
        let engine = Engine { backend, model, tokenizer: tokenizer.clone(), stats: stats.clone() };
        let thread = std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || {
                while let Ok((job, queued, span)) = rx.recv() {
                    engine.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    let _enter = span.enter();
                    engine.run(job, queued.elapsed());
                }
            })
            .expect("spawning an engine thread");
        Self {
            id,
            tokenizer,
            context_length,
            vocab_size,
            hidden_size,
            size_bytes,
            loaded_at: std::time::SystemTime::now(),
            load_duration,
            stats,
            queue: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues a generation; its events arrive on `events` tagged with `index`.
    pub fn generate(
        &self,
        req: GenerateRequest,
        context_len: usize,
        index: usize,
        events: mpsc::UnboundedSender<Tagged>,
    ) -> Result<(), SubmitError> {
        self.submit(Job::Generate { req, context_len, index, events })
    }

    /// Mean-pooled final hidden states of each input (not normalized).
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Embed { inputs, reply }).map_err(EmbedError::Submit)?;
        rx.await.map_err(|_| EmbedError::Submit(SubmitError::Stopped))?.map_err(EmbedError::Engine)
    }

    fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let queue = self.queue.as_ref().ok_or(SubmitError::Stopped)?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = queue.try_send((job, Instant::now(), tracing::Span::current()));
        if sent.is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        sent.map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; it is not joined here (it may be inside a
        // long generation whose client is gone), it exits on its own.
        self.queue.take();
        self.thread.take();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Submit(SubmitError),
    #[error("{0}")]
    Engine(String),
}

struct Engine {
    backend: CpuBackend,
    model: Llama<CpuBackend>,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<EngineStats>,
}

impl Engine {
    fn run(&self, job: Job, queue: Duration) {
        match job {
            Job::Generate { req, context_len, index, events } => self.generate(req, context_len, index, events, queue),
            Job::Embed { inputs, reply } => {
                let out = self.embed(&inputs);
                let _ = reply.send(out);
            }
        }
    }

    fn generate(
        &self,
        req: GenerateRequest,
        context_len: usize,
        index: usize,
        events: mpsc::UnboundedSender<Tagged>,
        queue: Duration,
    ) {
        let stats = &self.stats;
        if events.is_closed() {
            tracing::info!("client left while the request was queued; skipped");
            stats.finished_abort.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats.running.fetch_add(1, Ordering::Relaxed);
        let prompt_tokens = req.prompt_ids.len();
        let result = generate(&self.model, &self.backend, &self.tokenizer, req, context_len, |e| {
            stats.generation_tokens.fetch_add(u64::from(e.token.is_some()), Ordering::Relaxed);
            let event = Event::Token { text: e.text.to_owned(), token: e.token, logprobs: e.logprobs.cloned() };
            match events.send((index, event)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        stats.running.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(g) => {
                stats.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                let counter = match g.finish_reason {
                    FinishReason::Stop => &stats.finished_stop,
                    FinishReason::Length => &stats.finished_length,
                    FinishReason::Cancelled => &stats.finished_abort,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    prompt_tokens,
                    generated = g.tokens.len(),
                    finish = g.finish_reason.as_str(),
                    queue_ms = queue.as_millis() as u64,
                    prompt_ms = g.timings.prompt_ms as u64,
                    decode_ms = g.timings.decode_ms as u64,
                    "generation finished"
                );
                let summary = Summary {
                    finish_reason: g.finish_reason,
                    stop_reason: g.stop_reason,
                    prompt_tokens,
                    tokens: g.tokens,
                    queue,
                    prompt_eval: Duration::from_secs_f64(g.timings.prompt_ms / 1000.0),
                    eval: Duration::from_secs_f64(g.timings.decode_ms / 1000.0),
                };
                let _ = events.send((index, Event::Done(summary)));
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "generation failed");
                let _ = events.send((index, Event::Error(e.to_string())));
            }
        }
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let cols = self.model.layout().kv_cols();
        inputs
            .iter()
            .map(|ids| {
                let mut cache = ContiguousKvCache::new(&self.backend, self.model.config.n_layers, cols, ids.len())
                    .map_err(|e| e.to_string())?;
                self.stats.prompt_tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
                self.model.embed_mean(&self.backend, ids, &mut cache).map_err(|e| e.to_string())
            })
            .collect()
    }
}
