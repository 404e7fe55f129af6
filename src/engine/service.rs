//! A loaded model behind a queue: the HTTP handlers talk to it through a [`ModelHandle`]; a
//! supervisor thread ([`super::supervisor`]) owns the engine thread ([`super::batch`]) that holds
//! the weights and the paged KV cache, restarts it when it fails, and answers for it while it
//! cannot.
//!
//! Life of a model: the supervisor loads it and runs a short warm-up generation, and only then
//! is the model `ready` (so the first real request pays no cold start). If the engine panics or
//! reports a fatal backend error, its in-flight requests that have streamed nothing are retried
//! once in the next incarnation and the others end with an error event; the supervisor reloads
//! the model after a backoff. Too many failures within a window mark the model `failed`, and
//! submissions get [`SubmitError::Unavailable`] with the reason. The engine loop beats a
//! heartbeat; an engine that is `ready` but has not beaten within the stall timeout is
//! `stalled`: its in-flight requests end with an error, and new ones are refused.
//!
//! Cancellation: a generation job streams [`Event`]s into a channel whose receiver is the HTTP
//! response. When the client goes away the response is dropped, the channel closes, and the
//! engine sees it at its next token and stops before the next forward pass.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::fault::Fault;
use super::histogram::{Histogram, E2E_BOUNDS, TPOT_BOUNDS, TTFT_BOUNDS};
use super::supervisor::{Core, Init, Supervisor};
use crate::engine::generate::{FinishReason, GenerateRequest, TokenLogprobs};
use crate::model::loaded::AnyModel;
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
    /// The model failed or its engine is stalled; the text says which and why.
    #[error("{0}")]
    Unavailable(String),
}

/// Loads (and on restart reloads) the model an engine serves.
pub type Loader = Box<dyn FnMut() -> Result<AnyModel, String> + Send>;

/// What a generation job carries through the queue, and what the supervisor keeps of it while
/// it is in the engine (to retry it, or to tell its client the engine failed).
#[derive(Clone)]
pub(super) struct Ticket {
    pub req: GenerateRequest,
    /// Set when the job went back for a retry after an engine failure (it gets one).
    pub retried: bool,
    pub meta: Meta,
}

/// A job's delivery details, shared by the waiting and running states.
#[derive(Clone)]
pub(super) struct Meta {
    pub context_len: usize,
    pub index: usize,
    pub events: mpsc::UnboundedSender<Tagged>,
    /// Set once a token went out: from then on the job cannot be retried.
    pub streamed: Arc<AtomicBool>,
    pub queued: Instant,
    pub span: tracing::Span,
}

pub(super) enum Job {
    Generate(Box<Ticket>),
    Embed { inputs: Vec<Vec<u32>>, reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>> },
}

/// Counters the engine keeps per model (the metrics endpoint reads them). They outlive engine
/// restarts.
#[derive(Debug)]
pub struct EngineStats {
    pub running: AtomicUsize,
    /// The most sequences ever running at once.
    pub running_peak: AtomicUsize,
    /// Queued jobs and sequences not yet admitted.
    pub waiting: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub finished_abort: AtomicU64,
    pub errors: AtomicU64,
    pub kv_blocks: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub preemptions: AtomicU64,
    /// Requests that went transparently into a restarted engine (they had streamed nothing).
    pub retries: AtomicU64,
    /// Arrival to first token.
    pub ttft: Histogram,
    /// Mean time between output tokens after the first, per request.
    pub tpot: Histogram,
    /// Arrival to the last event.
    pub e2e: Histogram,
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            running: AtomicUsize::new(0),
            running_peak: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            finished_abort: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            kv_blocks: AtomicUsize::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            tpot: Histogram::new(TPOT_BOUNDS),
            e2e: Histogram::new(E2E_BOUNDS),
        }
    }
}

/// Batching, KV-cache and supervision settings of one engine.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Jobs that may wait in the queue before submissions get `Busy`.
    pub max_queue: usize,
    /// Sequences decoded together per step (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Tokens per forward across all sequences; long prompts are fed in chunks of what is left
    /// after the decoding sequences, so they do not stall them.
    pub max_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes the KV cache may use (all layers, K and V); sets the number of blocks.
    pub kv_cache_bytes: usize,
    /// A ready engine that has not stepped (or polled its queue) for this long is stalled.
    pub stall_timeout: Duration,
    /// Delay before the first restart; doubles with each failure in the window (at most 30 s).
    pub restart_backoff: Duration,
    /// Failures within [`FAILURE_WINDOW`] that are restarted; one more marks the model failed.
    pub max_restarts: u32,
    /// Run a short generation after each load before the model is ready.
    pub warmup: bool,
    /// Injected failure (acted on only with the `fault-injection` feature).
    pub fault: Option<Fault>,
}

/// Failures older than this no longer count toward `max_restarts`.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(600);

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_num_seqs: 8,
            max_batched_tokens: 512,
            block_size: crate::model::paged_kv::DEFAULT_BLOCK_SIZE,
            kv_cache_bytes: 512 << 20,
            stall_timeout: Duration::from_secs(30),
            restart_backoff: Duration::from_millis(500),
            max_restarts: 3,
            warmup: true,
            fault: None,
        }
    }
}

/// Where an engine is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Loading and warming up (the first time, or after a failure).
    Starting,
    Ready,
    /// Failed; the supervisor reloads it after a backoff.
    Restarting {
        attempt: u32,
        reason: String,
    },
    /// Ready but not stepping: no heartbeat within the stall timeout.
    Stalled {
        reason: String,
    },
    /// Failed too often: requests get 503 with the reason until it is unloaded.
    Failed {
        reason: String,
    },
    /// Its queue closed (the model was unloaded) and its last jobs ended.
    Stopped,
}

impl EngineState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting { .. } => "restarting",
            Self::Stalled { .. } => "stalled",
            Self::Failed { .. } => "failed",
            Self::Stopped => "stopped",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Restarting { reason, .. } | Self::Stalled { reason } | Self::Failed { reason } => Some(reason),
            _ => None,
        }
    }
}

/// Liveness of one model's engine: its state, heartbeat and restart count.
#[derive(Debug)]
pub struct EngineHealth {
    epoch: Instant,
    beat_ms: AtomicU64,
    /// When a generation last finished (for keep-alive timing).
    finish_ms: AtomicU64,
    state: Mutex<EngineState>,
    pub restarts: AtomicU64,
    pub stall_timeout: Duration,
}

impl EngineHealth {
    pub(super) fn new(stall_timeout: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            beat_ms: AtomicU64::new(0),
            finish_ms: AtomicU64::new(0),
            state: Mutex::new(EngineState::Starting),
            restarts: AtomicU64::new(0),
            stall_timeout,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn beat(&self) {
        self.beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(super) fn finished_one(&self) {
        self.finish_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(super) fn set(&self, s: EngineState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The state as set by the engine and supervisor (a stall not yet derived).
    pub(super) fn raw_state(&self) -> EngineState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Time since the engine loop last beat.
    pub fn since_beat(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.beat_ms.load(Ordering::Relaxed)))
    }

    /// The current state; a ready engine whose heartbeat is older than the stall timeout is
    /// reported stalled even before the supervisor has acted on it.
    pub fn state(&self) -> EngineState {
        let s = self.raw_state();
        let since = self.since_beat();
        if s == EngineState::Ready && since > self.stall_timeout {
            return EngineState::Stalled { reason: stall_reason(since, self.stall_timeout) };
        }
        s
    }

    /// Ready and beating.
    pub fn is_alive(&self) -> bool {
        self.state() == EngineState::Ready
    }

    /// Alive, or on its way back (loading or restarting after a failure; restarts are bounded
    /// by `max_restarts`): what the systemd watchdog vouches for.
    pub fn is_live_or_recovering(&self) -> bool {
        matches!(self.state(), EngineState::Ready | EngineState::Starting | EngineState::Restarting { .. })
    }

    /// When the last generation finished (the load time if none has).
    pub fn last_finish(&self) -> Instant {
        self.epoch + Duration::from_millis(self.finish_ms.load(Ordering::Relaxed))
    }
}

pub(super) fn stall_reason(since: Duration, timeout: Duration) -> String {
    format!(
        "the engine has made no progress for {:.1} s (stall timeout {:.1} s)",
        since.as_secs_f64(),
        timeout.as_secs_f64()
    )
}

/// A model the server can use: its tokenizer and limits for request preparation, and the queue
/// into its supervised engine. Dropping the last handle closes the queue; the engine finishes
/// the sequences it holds and exits, and so does its supervisor.
pub struct ModelHandle {
    pub id: String,
    pub tokenizer: Arc<Tokenizer>,
    pub context_length: usize,
    /// Tokens the sampler may choose: the smaller of tokenizer and head vocabularies.
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Bytes of weights (the model files).
    pub weight_bytes: u64,
    /// Bytes of the KV cache the engine allocated.
    pub kv_bytes: u64,
    pub loaded_at: std::time::SystemTime,
    /// Load and warm-up, the first time.
    pub load_duration: Duration,
    /// The warm-up generation's time (`None` when warm-up is off).
    pub warmup: Option<Duration>,
    pub stats: Arc<EngineStats>,
    pub health: Arc<EngineHealth>,
    /// A vision-language model's tower and image settings (`None` for text models).
    pub vision: Option<Arc<crate::vision::Vision>>,
    queue: SyncSender<(Job, Instant, tracing::Span)>,
}

impl ModelHandle {
    /// Starts the supervisor, which loads the model with `loader`, allocates its KV cache and
    /// warms it up; returns once the model is ready, or with the load's error.
    pub fn start(id: &str, loader: Loader, weight_bytes: u64, config: &EngineConfig) -> Result<Self, String> {
        let stats = Arc::new(EngineStats::default());
        let health = Arc::new(EngineHealth::new(config.stall_timeout));
        let (tx, rx) = sync_channel(config.max_queue.max(1));
        let (init_tx, init_rx) = sync_channel::<Result<Init, String>>(1);
        let core = Arc::new(Core::new(id, stats.clone(), health.clone()));
        let supervisor = Supervisor { loader, config: config.clone(), core };
        std::thread::Builder::new()
            .name(format!("supervisor-{id}"))
            .spawn(move || supervisor.run(rx, init_tx))
            .map_err(|e| format!("spawning the supervisor thread: {e}"))?;
        let init = init_rx.recv().map_err(|_| "the engine ended before the model was ready".to_owned())??;
        Ok(Self {
            id: id.to_owned(),
            tokenizer: init.tokenizer,
            context_length: init.context_length,
            vocab_size: init.vocab_size,
            hidden_size: init.hidden_size,
            weight_bytes,
            kv_bytes: init.kv_bytes,
            loaded_at: std::time::SystemTime::now(),
            load_duration: init.load_duration,
            warmup: init.warmup,
            stats,
            health,
            vision: init.vision,
            queue: tx,
        })
    }

    /// Bytes this model holds: weights and KV cache.
    pub fn size_bytes(&self) -> u64 {
        self.weight_bytes + self.kv_bytes
    }

    /// False once the engine has failed for good or stopped: its weights and cache are gone.
    pub fn holds_memory(&self) -> bool {
        !matches!(self.health.raw_state(), EngineState::Failed { .. } | EngineState::Stopped)
    }

    /// Whether any request is queued or running.
    pub fn busy(&self) -> bool {
        self.stats.running.load(Ordering::SeqCst) + self.stats.waiting.load(Ordering::SeqCst) > 0
    }

    /// `Err` with the reason when the model cannot take requests now (failed or stalled).
    pub fn available(&self) -> Result<(), SubmitError> {
        match self.health.state() {
            EngineState::Failed { reason } => {
                Err(SubmitError::Unavailable(format!("model '{}' has failed: {reason}", self.id)))
            }
            EngineState::Stalled { reason } => {
                Err(SubmitError::Unavailable(format!("model '{}' is not responding: {reason}", self.id)))
            }
            _ => Ok(()),
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
        let meta = Meta {
            context_len,
            index,
            events,
            streamed: Arc::new(AtomicBool::new(false)),
            queued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.submit(Job::Generate(Box::new(Ticket { req, retried: false, meta })))
    }

    /// Mean-pooled final hidden states of each input (not normalized).
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Embed { inputs, reply }).map_err(EmbedError::Submit)?;
        rx.await.map_err(|_| EmbedError::Submit(SubmitError::Stopped))?.map_err(EmbedError::Engine)
    }

    fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.available()?;
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let sent = self.queue.try_send((job, Instant::now(), tracing::Span::current()));
        if sent.is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        sent.map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Submit(SubmitError),
    #[error("{0}")]
    Engine(String),
}
