//! A loaded model behind a queue: one engine thread owns the weights and the paged KV cache; the
//! HTTP handlers talk to it through a [`ModelHandle`].
//!
//! Continuous batching: jobs wait in a bounded queue (full → [`SubmitError::Busy`], which the API
//! turns into 503). The loop admits waiting sequences first come first served while
//! `max_num_seqs` and the free blocks allow (asking `can_allocate` before taking any; a prompt's
//! hashed full blocks come from the prefix cache), then runs one forward over every running
//! sequence per step: decode tokens first, then prompt chunks in what is left of
//! `max_batched_tokens`, so a long prompt never stalls decoding. When blocks run out, the newest
//! other sequence is preempted — its blocks freed, its decoder kept — and recomputed from its
//! history when it is admitted again. Each sequence's [`SeqDecoder`] samples and applies the same
//! finish rules as `generate`, so a request's greedy output does not depend on what runs beside
//! it. Embedding jobs run between steps.
//!
//! Cancellation: a generation job streams [`Event`]s into a channel whose receiver is the HTTP
//! response. When the client goes away the response is dropped, the channel closes, and the
//! engine sees it at its next token and stops before the next forward pass. A job whose
//! receiver is already gone when its turn comes is skipped.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::backend::cpu::CpuBackend;
use crate::engine::generate::{Emitted, FinishReason, GenerateRequest, SeqDecoder, TokenLogprobs};
use crate::model::kv_cache::ContiguousKvCache;
use crate::model::llama::Llama;
use crate::model::loaded::LoadedModel;
use crate::model::paged_kv::{PagedKvCache, Sequence};
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
    /// The most sequences ever running at once.
    pub running_peak: AtomicUsize,
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
}

/// Batching and KV-cache settings of one engine.
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_num_seqs: 8,
            max_batched_tokens: 512,
            block_size: crate::model::paged_kv::DEFAULT_BLOCK_SIZE,
            kv_cache_bytes: 512 << 20,
        }
    }
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
    /// Dropping it ends the engine loop once the running sequences finish; the thread is not
    /// joined (it may be inside a long generation whose client is gone), it exits on its own.
    queue: SyncSender<(Job, Instant, tracing::Span)>,
}

impl ModelHandle {
    /// Starts the engine thread for `loaded`; allocates its KV cache (an error if the budget
    /// holds less than one block per sequence).
    pub fn start(
        loaded: LoadedModel<CpuBackend>,
        size_bytes: u64,
        load_duration: Duration,
        config: &EngineConfig,
    ) -> Result<Self, String> {
        let LoadedModel { id, backend, model, tokenizer, context_length } = loaded;
        let tokenizer = Arc::new(tokenizer);
        let vocab_size = tokenizer.vocab_size().min(model.config.vocab_size);
        let hidden_size = model.config.hidden_size;
        let stats = Arc::new(EngineStats::default());
        let kv_cols = model.layout().kv_cols();
        let bytes_per_block = config.block_size * kv_cols * model.config.n_layers * 2 * std::mem::size_of::<f32>();
        // No more blocks than every sequence at full context could use.
        let most = (config.max_num_seqs * context_length).div_ceil(config.block_size);
        let num_blocks = (config.kv_cache_bytes / bytes_per_block.max(1)).min(most);
        if num_blocks < config.max_num_seqs.max(1) {
            return Err(format!(
                "kv_cache_bytes = {} holds {num_blocks} blocks of {} tokens ({bytes_per_block} bytes each); \
                 at least max_num_seqs = {} are needed",
                config.kv_cache_bytes, config.block_size, config.max_num_seqs
            ));
        }
        let cache = PagedKvCache::new(&backend, model.config.n_layers, kv_cols, num_blocks, config.block_size)
            .map_err(|e| e.to_string())?;
        tracing::info!(model = %id, num_blocks, block_size = config.block_size, "KV cache allocated");
        stats.kv_blocks.store(num_blocks, Ordering::Relaxed);
        let (tx, rx) = sync_channel::<(Job, Instant, tracing::Span)>(config.max_queue.max(1));
        let engine = Engine {
            backend,
            model,
            tokenizer: tokenizer.clone(),
            stats: stats.clone(),
            max_num_seqs: config.max_num_seqs.max(1),
            max_batched_tokens: config.max_batched_tokens.max(1),
        };
        std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || engine.serve(rx, cache))
            .map_err(|e| format!("spawning the engine thread: {e}"))?;
        Ok(Self {
            id,
            tokenizer,
            context_length,
            vocab_size,
            hidden_size,
            size_bytes,
            loaded_at: std::time::SystemTime::now(),
            load_duration,
            stats,
            queue: tx,
        })
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
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self.queue.try_send((job, Instant::now(), tracing::Span::current()));
        if sent.is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
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

struct Engine {
    backend: CpuBackend,
    model: Llama<CpuBackend>,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<EngineStats>,
    max_num_seqs: usize,
    max_batched_tokens: usize,
}

/// A sequence not yet admitted, or preempted (then its decoder holds what it generated).
struct Waiting<'t> {
    dec: SeqDecoder<'t>,
    context_len: usize,
    index: usize,
    events: mpsc::UnboundedSender<Tagged>,
    queued: Instant,
    span: tracing::Span,
}

/// An admitted sequence.
struct Running<'t> {
    dec: SeqDecoder<'t>,
    seq: Sequence,
    /// Ids not yet forwarded: the (rest of the) prompt, or the last sampled token.
    pending: Vec<u32>,
    context_len: usize,
    index: usize,
    events: mpsc::UnboundedSender<Tagged>,
    queued: Instant,
    queue_time: Duration,
    span: tracing::Span,
}

impl Engine {
    /// The engine loop: take jobs, admit sequences while blocks and `max_num_seqs` allow, run
    /// one forward over every running sequence, sample, stream, finish — until the queue closes
    /// and nothing is left.
    fn serve(self, rx: Receiver<(Job, Instant, tracing::Span)>, mut cache: PagedKvCache<CpuBackend>) {
        let tok: &Tokenizer = &self.tokenizer;
        let mut waiting: VecDeque<Waiting<'_>> = VecDeque::new();
        let mut running: Vec<Running<'_>> = Vec::new();
        let mut open = true;
        loop {
            // Intake: block only when idle; look ahead no further than a batch, so the bounded
            // channel stays the queue's bound.
            while open && waiting.len() < self.max_num_seqs {
                let job = if running.is_empty() && waiting.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                let (job, queued, span) = job;
                match job {
                    Job::Embed { inputs, reply } => {
                        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                        let _enter = span.enter();
                        let _ = reply.send(self.embed(&inputs));
                    }
                    Job::Generate { req, context_len, index, events } => {
                        match SeqDecoder::new(tok, self.model.config.vocab_size, req, context_len) {
                            Ok(dec) => waiting.push_back(Waiting { dec, context_len, index, events, queued, span }),
                            Err(e) => {
                                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                                self.fail(&events, index, &span, e.to_string());
                            }
                        }
                    }
                }
            }
            if !open && running.is_empty() && waiting.is_empty() {
                return;
            }
            self.admit(&mut cache, &mut waiting, &mut running);
            if running.is_empty() {
                continue;
            }
            self.step(&mut cache, &mut waiting, &mut running);
            self.stats.kv_blocks_used.store(cache.pool.num_blocks() - cache.pool.available(), Ordering::Relaxed);
            // In tokens, as vLLM counts them.
            let bs = cache.pool.block_size() as u64;
            self.stats.prefix_queries.store(cache.pool.queries * bs, Ordering::Relaxed);
            self.stats.prefix_hits.store(cache.pool.hits * bs, Ordering::Relaxed);
        }
    }

    /// Moves waiting sequences to running, first come first served, while `max_num_seqs` and
    /// the free blocks (`can_allocate` before anything is taken) allow.
    fn admit<'t>(
        &self,
        cache: &mut PagedKvCache<CpuBackend>,
        waiting: &mut VecDeque<Waiting<'t>>,
        running: &mut Vec<Running<'t>>,
    ) {
        while running.len() < self.max_num_seqs {
            let Some(w) = waiting.front() else { return };
            if w.events.is_closed() {
                let w = waiting.pop_front().expect("front exists");
                let _enter = w.span.enter();
                tracing::info!("client left while the request was queued; skipped");
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                self.stats.finished_abort.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A preempted sequence recomputes everything it has (prompt and generated).
            let history = w.dec.history().to_vec();
            let (seq, cached) = cache.start(&history, w.context_len);
            let need = cache.blocks_needed(&seq, history.len() - cached + 1);
            if !cache.pool.can_allocate(need) {
                let mut seq = seq;
                cache.free(&mut seq);
                return;
            }
            let w = waiting.pop_front().expect("front exists");
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let now_running = self.stats.running.fetch_add(1, Ordering::Relaxed) + 1;
            self.stats.running_peak.fetch_max(now_running, Ordering::Relaxed);
            let mut dec = w.dec;
            dec.begin();
            running.push(Running {
                dec,
                seq,
                pending: history[cached..].to_vec(),
                context_len: w.context_len,
                index: w.index,
                events: w.events,
                queue_time: w.queued.elapsed(),
                queued: w.queued,
                span: w.span,
            });
        }
    }

    /// One forward over the running sequences (decode tokens first, then prompt chunks within
    /// the token budget), then sampling for every sequence whose pending ids were all fed.
    fn step<'t>(
        &self,
        cache: &mut PagedKvCache<CpuBackend>,
        waiting: &mut VecDeque<Waiting<'t>>,
        running: &mut Vec<Running<'t>>,
    ) {
        // Clients that left between steps.
        let mut i = 0;
        while i < running.len() {
            if running[i].events.is_closed() {
                let mut r = running.remove(i);
                r.dec.cancel();
                self.finish(cache, r);
            } else {
                i += 1;
            }
        }
        // Decide how many pending ids each sequence feeds, and make sure its blocks exist,
        // preempting the most recently admitted sequences when the pool runs dry.
        let mut budget = self.max_batched_tokens;
        let mut take = vec![0usize; running.len()];
        let order: Vec<usize> = {
            let mut o: Vec<usize> = (0..running.len()).collect();
            // Decodes (one pending id) before prefills, so prompts never stall decoding.
            o.sort_by_key(|&i| (running[i].pending.len() > 1, i));
            o
        };
        for &i in &order {
            if budget == 0 {
                break;
            }
            let n = running[i].pending.len().min(budget);
            take[i] = n;
            budget -= n;
        }
        // Blocks each sequence will take in this forward, counted together against the pool.
        let mut reserved: Vec<usize> = Vec::with_capacity(running.len());
        let mut i = 0;
        while i < running.len() {
            let need = cache.blocks_needed(&running[i].seq, take[i]);
            if cache.pool.can_allocate(reserved.iter().sum::<usize>() + need) {
                reserved.push(need);
                i += 1;
                continue;
            }
            // Preempt the newest other sequence (recompute later), or fail this one if alone.
            let victim = (0..running.len()).rev().find(|&j| j != i);
            match victim {
                Some(j) => {
                    let mut r = running.remove(j);
                    take.remove(j);
                    if j < i {
                        reserved.remove(j);
                        i -= 1;
                    }
                    cache.free(&mut r.seq);
                    self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    self.stats.running.fetch_sub(1, Ordering::Relaxed);
                    self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                    r.span.in_scope(|| tracing::info!("preempted: KV blocks ran out; will recompute"));
                    waiting.push_front(Waiting {
                        dec: r.dec,
                        context_len: r.context_len,
                        index: r.index,
                        events: r.events,
                        queued: r.queued,
                        span: r.span,
                    });
                }
                None => {
                    let r = running.remove(i);
                    take.remove(i);
                    let msg = format!(
                        "the KV cache ({} blocks of {} tokens) cannot hold this sequence; raise kv_cache_bytes",
                        cache.pool.num_blocks(),
                        cache.pool.block_size()
                    );
                    self.stats.running.fetch_sub(1, Ordering::Relaxed);
                    let mut seq = r.seq;
                    cache.free(&mut seq);
                    self.fail(&r.events, r.index, &r.span, msg);
                }
            }
        }
        let fed: Vec<usize> = (0..running.len()).filter(|&i| take[i] > 0).collect();
        if fed.is_empty() {
            return;
        }
        let chunks: Vec<Vec<u32>> = fed.iter().map(|&i| running[i].pending[..take[i]].to_vec()).collect();
        let logits = {
            let mut batch: Vec<(&[u32], &mut Sequence)> = Vec::with_capacity(fed.len());
            let mut k = 0;
            for (i, r) in running.iter_mut().enumerate() {
                if take[i] > 0 {
                    batch.push((&chunks[k], &mut r.seq));
                    k += 1;
                }
            }
            self.model.forward_batch(&self.backend, cache, &mut batch)
        };
        let mut logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed forward leaves these sequences' caches undefined: end them all.
                let msg = format!("forward pass failed: {e}");
                for r in running.drain(..) {
                    self.stats.running.fetch_sub(1, Ordering::Relaxed);
                    let mut seq = r.seq;
                    cache.free(&mut seq);
                    self.fail(&r.events, r.index, &r.span, msg.clone());
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (k, &i) in fed.iter().enumerate() {
            let r = &mut running[i];
            r.pending.drain(..take[i]);
            if !r.pending.is_empty() {
                continue; // a prompt chunk: its logits predict nothing yet
            }
            let stats = &self.stats;
            let (events, index) = (&r.events, r.index);
            let mut on_token = |e: Emitted<'_>| {
                stats.generation_tokens.fetch_add(u64::from(e.token.is_some()), Ordering::Relaxed);
                let event = Event::Token { text: e.text.to_owned(), token: e.token, logprobs: e.logprobs.cloned() };
                match events.send((index, event)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            };
            match r.dec.step(&mut logits[k], &mut on_token) {
                Some(id) => r.pending.push(id),
                None => finished.push(i),
            }
        }
        for &i in finished.iter().rev() {
            let r = running.remove(i);
            self.finish(cache, r);
        }
    }

    /// Frees a sequence's blocks and sends its `Done`.
    fn finish(&self, cache: &mut PagedKvCache<CpuBackend>, r: Running<'_>) {
        let Running { dec, mut seq, events, index, span, queue_time, .. } = r;
        cache.free(&mut seq);
        let stats = &self.stats;
        // Before `running` drops, so whoever sees the sequence gone also sees its blocks back.
        stats.kv_blocks_used.store(cache.pool.num_blocks() - cache.pool.available(), Ordering::SeqCst);
        stats.running.fetch_sub(1, Ordering::SeqCst);
        let mut on_token = |e: Emitted<'_>| {
            let _ = events.send((index, Event::Token { text: e.text.to_owned(), token: e.token, logprobs: None }));
            ControlFlow::Continue(())
        };
        let g = dec.finish(&mut on_token);
        stats.prompt_tokens.fetch_add(g.prompt_tokens as u64, Ordering::Relaxed);
        let counter = match g.finish_reason {
            FinishReason::Stop => &stats.finished_stop,
            FinishReason::Length => &stats.finished_length,
            FinishReason::Cancelled => &stats.finished_abort,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _enter = span.enter();
        tracing::info!(
            prompt_tokens = g.prompt_tokens,
            generated = g.tokens.len(),
            finish = g.finish_reason.as_str(),
            queue_ms = queue_time.as_millis() as u64,
            prompt_ms = g.timings.prompt_ms as u64,
            decode_ms = g.timings.decode_ms as u64,
            "generation finished"
        );
        let summary = Summary {
            finish_reason: g.finish_reason,
            stop_reason: g.stop_reason,
            prompt_tokens: g.prompt_tokens,
            tokens: g.tokens,
            queue: queue_time,
            prompt_eval: Duration::from_secs_f64(g.timings.prompt_ms / 1000.0),
            eval: Duration::from_secs_f64(g.timings.decode_ms / 1000.0),
        };
        let _ = events.send((index, Event::Done(summary)));
    }

    fn fail(&self, events: &mpsc::UnboundedSender<Tagged>, index: usize, span: &tracing::Span, message: String) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        span.in_scope(|| tracing::warn!(error = %message, "generation failed"));
        let _ = events.send((index, Event::Error(message)));
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
