//! One engine incarnation: load, warm up, then continuous batching until the queue closes or
//! something fatal happens (returned as `Err`, or a panic — the supervisor handles both).
//!
//! Jobs wait in a bounded queue (full → [`SubmitError::Busy`](super::service::SubmitError),
//! which the API turns into 503). The loop admits waiting sequences first come first served
//! while `max_num_seqs` and the free blocks allow (asking `can_allocate` before taking any; a
//! prompt's hashed full blocks come from the prefix cache), then runs one forward over every
//! running sequence per step: decode tokens first, then prompt chunks in what is left of
//! `max_batched_tokens`, so a long prompt never stalls decoding. When blocks run out, the newest
//! other sequence is preempted — its blocks freed, its decoder kept — and recomputed from its
//! history when it is admitted again. Each sequence's [`SeqDecoder`] samples and applies the same
//! finish rules as `generate`, so a request's greedy output does not depend on what runs beside
//! it. Embedding jobs run between steps.
//!
//! Every job the engine takes from the queue is recorded in the supervisor's in-flight table
//! until it ends, so that a failure can retry or answer it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::service::{EngineConfig, EngineState, Event, Job, Loader, Meta, Summary, Ticket};
use super::supervisor::{Core, Init, Phase, Queue};
use crate::backend::Backend;
use crate::engine::fault::Fault;
use crate::engine::generate::{Emitted, FinishReason, SeqDecoder};
use crate::model::kv_cache::ContiguousKvCache;
use crate::model::llama::Llama;
use crate::model::loaded::{AnyModel, LoadedModel};
use crate::model::paged_kv::{PagedKvCache, Sequence};
use crate::model::tokenizer::Tokenizer;

/// Loads the model, allocates the KV cache, warms up, reports ready, and serves.
pub(super) fn incarnation(
    loader: &mut Loader,
    core: &Core,
    config: &EngineConfig,
    rx: &Mutex<Queue>,
    carried: Vec<(u64, Ticket)>,
    init: Option<&SyncSender<Result<Init, String>>>,
) -> Result<(), String> {
    let t = Instant::now();
    match loader()? {
        AnyModel::Cpu(m) => run(*m, t, core, config, rx, carried, init),
        #[cfg(feature = "cuda")]
        AnyModel::Cuda(m) => run(*m, t, core, config, rx, carried, init),
    }
}

/// The incarnation on the backend the model was loaded onto.
fn run<B: Backend>(
    loaded: LoadedModel<B>,
    t: Instant,
    core: &Core,
    config: &EngineConfig,
    rx: &Mutex<Queue>,
    carried: Vec<(u64, Ticket)>,
    init: Option<&SyncSender<Result<Init, String>>>,
) -> Result<(), String>
where
    B::KvLayer: Send,
{
    let LoadedModel { backend, model, tokenizer, context_length, vision, .. } = loaded;
    let kv_cols = model.layout().kv_cols();
    let bytes_per_block = config.block_size * kv_cols * model.config.n_layers * 2 * backend.kv_value_bytes();
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
    let mut cache = PagedKvCache::new(&backend, model.config.n_layers, kv_cols, num_blocks, config.block_size)
        .map_err(|e| format!("allocating the KV cache: {e}"))?;
    tracing::info!(model = %core.id, num_blocks, block_size = config.block_size, "KV cache allocated");
    let tokenizer = Arc::new(tokenizer);
    let engine = Engine {
        vocab_size: tokenizer.vocab_size().min(model.config.vocab_size),
        hidden_size: model.config.hidden_size,
        backend,
        model,
        tokenizer,
        core,
        max_num_seqs: config.max_num_seqs.max(1),
        max_batched_tokens: config.max_batched_tokens.max(1),
        context_length,
        beat_every: (config.stall_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)),
        steps: Cell::new(0),
        fault: config.fault.clone(),
        prefix_seen: Cell::new((0, 0)),
    };
    let warmup = if config.warmup { Some(engine.warm_up(&mut cache)?) } else { None };
    engine.prefix_seen.set((cache.pool.queries, cache.pool.hits));
    core.stats.kv_blocks.store(num_blocks, Ordering::SeqCst);
    core.stats.kv_blocks_used.store(0, Ordering::SeqCst);
    core.health.beat();
    core.health.set(EngineState::Ready);
    core.ready_once.store(true, Ordering::SeqCst);
    let load_duration = t.elapsed();
    tracing::info!(
        model = %core.id,
        ms = load_duration.as_millis() as u64,
        warmup_ms = warmup.map(|w| w.as_millis() as u64),
        "engine ready"
    );
    if let Some(tx) = init {
        let _ = tx.send(Ok(Init {
            tokenizer: engine.tokenizer.clone(),
            context_length,
            vocab_size: engine.vocab_size,
            hidden_size: engine.hidden_size,
            kv_bytes: (num_blocks * bytes_per_block) as u64,
            load_duration,
            warmup,
            vision,
        }));
    }
    engine.serve(rx, cache, carried)
}

struct Engine<'c, B: Backend> {
    backend: B,
    model: Llama<B>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    hidden_size: usize,
    core: &'c Core,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    context_length: usize,
    /// How long an idle engine waits on its queue before beating again.
    beat_every: Duration,
    /// Forward steps of this incarnation.
    steps: Cell<u64>,
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fault: Option<Fault>,
    /// The pool's prefix-cache counters last added to the stats.
    prefix_seen: Cell<(u64, u64)>,
}

/// A sequence not yet admitted, or preempted (then its decoder holds what it generated).
struct Waiting<'t> {
    id: u64,
    dec: SeqDecoder<'t>,
    meta: Meta,
}

/// An admitted sequence.
struct Running<'t> {
    id: u64,
    dec: SeqDecoder<'t>,
    seq: Sequence,
    /// Ids not yet forwarded: the (rest of the) prompt, or the last sampled token.
    pending: Vec<u32>,
    meta: Meta,
    queue_time: Duration,
    first_token: Option<Instant>,
}

impl<B: Backend> Engine<'_, B>
where
    B::KvLayer: Send,
{
    /// The engine loop: take jobs, admit sequences while blocks and `max_num_seqs` allow, run
    /// one forward over every running sequence, sample, stream, finish — until the queue closes
    /// and nothing is left. `carry` (retries from a failed incarnation) goes first.
    fn serve(&self, rx: &Mutex<Queue>, mut cache: PagedKvCache<B>, carried: Vec<(u64, Ticket)>) -> Result<(), String> {
        let tok: &Tokenizer = &self.tokenizer;
        let mut waiting: VecDeque<Waiting<'_>> = VecDeque::new();
        let mut running: Vec<Running<'_>> = Vec::new();
        for (id, t) in carried {
            self.enqueue(tok, id, t, &mut waiting);
        }
        let mut open = true;
        loop {
            self.core.health.beat();
            // Intake: block (beating) only when idle; look ahead no further than a batch, so the
            // bounded channel stays the queue's bound.
            while open && waiting.len() < self.max_num_seqs {
                // The lock is held only to receive: a stalled engine leaves the queue to the
                // supervisor, which answers what waits in it.
                let queue = rx.lock().unwrap_or_else(|e| e.into_inner());
                let job = if running.is_empty() && waiting.is_empty() {
                    match queue.recv_timeout(self.beat_every) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout) => {
                            self.core.health.beat();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match queue.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                drop(queue);
                let (job, _, span) = job;
                match job {
                    Job::Embed { inputs, reply } => {
                        self.core.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                        let _enter = span.enter();
                        let _ = reply.send(self.embed(&inputs));
                    }
                    Job::Generate(t) => self.intake(tok, *t, &mut waiting),
                }
            }
            if !open && running.is_empty() && waiting.is_empty() {
                return Ok(());
            }
            self.admit(&mut cache, &mut waiting, &mut running);
            if running.is_empty() {
                continue;
            }
            self.step(&mut cache, &mut waiting, &mut running)?;
            let stats = &self.core.stats;
            stats.kv_blocks_used.store(cache.pool.num_blocks() - cache.pool.available(), Ordering::Relaxed);
            // In tokens, as vLLM counts them.
            let bs = cache.pool.block_size() as u64;
            let (q, h) = self.prefix_seen.replace((cache.pool.queries, cache.pool.hits));
            stats.prefix_queries.fetch_add((cache.pool.queries - q) * bs, Ordering::Relaxed);
            stats.prefix_hits.fetch_add((cache.pool.hits - h) * bs, Ordering::Relaxed);
        }
    }

    /// Records a job taken from the queue and makes it wait for admission.
    fn intake<'t>(&self, tok: &'t Tokenizer, t: Ticket, waiting: &mut VecDeque<Waiting<'t>>) {
        let id = self.core.register(t.clone());
        self.enqueue(tok, id, t, waiting);
    }

    /// Makes a recorded job wait for admission (or fails it when its request is invalid).
    fn enqueue<'t>(&self, tok: &'t Tokenizer, id: u64, t: Ticket, waiting: &mut VecDeque<Waiting<'t>>) {
        match SeqDecoder::new(tok, self.model.config.vocab_size, t.req, t.meta.context_len) {
            Ok(dec) => waiting.push_back(Waiting { id, dec, meta: t.meta }),
            Err(e) => {
                self.core.forget(id);
                self.core.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                self.core.fail(&t.meta, &e.to_string());
            }
        }
    }

    /// Moves waiting sequences to running, first come first served, while `max_num_seqs` and
    /// the free blocks (`can_allocate` before anything is taken) allow.
    fn admit<'t>(
        &self,
        cache: &mut PagedKvCache<B>,
        waiting: &mut VecDeque<Waiting<'t>>,
        running: &mut Vec<Running<'t>>,
    ) {
        let stats = &self.core.stats;
        while running.len() < self.max_num_seqs {
            let Some(w) = waiting.front() else { return };
            if w.meta.events.is_closed() {
                let w = waiting.pop_front().expect("front exists");
                w.meta.span.in_scope(|| tracing::info!("client left while the request was queued; skipped"));
                self.core.forget(w.id);
                stats.waiting.fetch_sub(1, Ordering::SeqCst);
                stats.finished_abort.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A preempted sequence recomputes everything it has (prompt and generated).
            let history = w.dec.history().to_vec();
            // Cached blocks are found by keys in which image placeholders stand for their images.
            let (seq, cached) = cache.start(&w.dec.history_keys(), w.meta.context_len);
            let need = cache.blocks_needed(&seq, history.len() - cached + 1);
            if !cache.pool.can_allocate(need) {
                let mut seq = seq;
                cache.free(&mut seq);
                if running.is_empty() {
                    // Even an empty pool cannot hold it: it would wait forever.
                    let w = waiting.pop_front().expect("front exists");
                    self.core.forget(w.id);
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    let msg = self.too_long(cache);
                    self.core.fail(&w.meta, &msg);
                    continue;
                }
                return;
            }
            let w = waiting.pop_front().expect("front exists");
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.core.set_phase(w.id, Phase::Running);
            let now_running = stats.running.fetch_add(1, Ordering::SeqCst) + 1;
            stats.running_peak.fetch_max(now_running, Ordering::Relaxed);
            let mut dec = w.dec;
            dec.begin();
            running.push(Running {
                id: w.id,
                dec,
                seq,
                pending: history[cached..].to_vec(),
                queue_time: w.meta.queued.elapsed(),
                meta: w.meta,
                first_token: None,
            });
        }
    }

    fn too_long(&self, cache: &PagedKvCache<B>) -> String {
        format!(
            "the KV cache ({} blocks of {} tokens) cannot hold this sequence; raise kv_cache_bytes",
            cache.pool.num_blocks(),
            cache.pool.block_size()
        )
    }

    /// One forward over the running sequences (decode tokens first, then prompt chunks within
    /// the token budget), then sampling for every sequence whose pending ids were all fed. An
    /// `Err` is fatal: the supervisor restarts the engine.
    fn step<'t>(
        &self,
        cache: &mut PagedKvCache<B>,
        waiting: &mut VecDeque<Waiting<'t>>,
        running: &mut Vec<Running<'t>>,
    ) -> Result<(), String> {
        let stats = &self.core.stats;
        // Clients that left between steps.
        let mut i = 0;
        while i < running.len() {
            if running[i].meta.events.is_closed() {
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
                    stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    self.core.set_phase(r.id, Phase::Waiting);
                    stats.running.fetch_sub(1, Ordering::SeqCst);
                    stats.waiting.fetch_add(1, Ordering::SeqCst);
                    r.meta.span.in_scope(|| tracing::info!("preempted: KV blocks ran out; will recompute"));
                    waiting.push_front(Waiting { id: r.id, dec: r.dec, meta: r.meta });
                }
                None => {
                    let r = running.remove(i);
                    take.remove(i);
                    let msg = self.too_long(cache);
                    self.core.forget(r.id);
                    stats.running.fetch_sub(1, Ordering::SeqCst);
                    let mut seq = r.seq;
                    cache.free(&mut seq);
                    self.core.fail(&r.meta, &msg);
                }
            }
        }
        let fed: Vec<usize> = (0..running.len()).filter(|&i| take[i] > 0).collect();
        if fed.is_empty() {
            return Ok(());
        }
        let step = self.steps.get() + 1;
        self.steps.set(step);
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &self.fault {
            f.at_step(step)?;
        }
        let chunks: Vec<Vec<u32>> = fed.iter().map(|&i| running[i].pending[..take[i]].to_vec()).collect();
        let mut logits = {
            let mut batch: Vec<(&[u32], &mut Sequence)> = Vec::with_capacity(fed.len());
            let mut mm = Vec::with_capacity(fed.len());
            let mut k = 0;
            for (i, r) in running.iter_mut().enumerate() {
                if take[i] > 0 {
                    batch.push((&chunks[k], &mut r.seq));
                    mm.push(r.dec.mm());
                    k += 1;
                }
            }
            // A failed forward leaves the cache undefined: fatal for this incarnation.
            self.model
                .forward_batch_mm(&self.backend, cache, &mut batch, &mm)
                .map_err(|e| format!("forward pass failed: {e}"))?
        };
        let mut finished = Vec::new();
        for (k, &i) in fed.iter().enumerate() {
            let r = &mut running[i];
            r.pending.drain(..take[i]);
            if !r.pending.is_empty() {
                continue; // a prompt chunk: its logits predict nothing yet
            }
            let (meta, first_token) = (&r.meta, &mut r.first_token);
            let mut on_token = |e: Emitted<'_>| {
                stats.generation_tokens.fetch_add(u64::from(e.token.is_some()), Ordering::Relaxed);
                if first_token.is_none() {
                    *first_token = Some(Instant::now());
                    stats.ttft.observe(meta.queued.elapsed());
                }
                let event = Event::Token { text: e.text.to_owned(), token: e.token, logprobs: e.logprobs.cloned() };
                meta.streamed.store(true, Ordering::SeqCst);
                match meta.events.send((meta.index, event)) {
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
        Ok(())
    }

    /// Frees a sequence's blocks and sends its `Done`.
    fn finish(&self, cache: &mut PagedKvCache<B>, r: Running<'_>) {
        let Running { id, dec, mut seq, meta, queue_time, first_token, .. } = r;
        cache.free(&mut seq);
        let stats = &self.core.stats;
        // Before `running` drops, so whoever sees the sequence gone also sees its blocks back.
        stats.kv_blocks_used.store(cache.pool.num_blocks() - cache.pool.available(), Ordering::SeqCst);
        self.core.set_phase(id, Phase::Finishing);
        stats.running.fetch_sub(1, Ordering::SeqCst);
        let mut on_token = |e: Emitted<'_>| {
            let _ = meta
                .events
                .send((meta.index, Event::Token { text: e.text.to_owned(), token: e.token, logprobs: None }));
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
        stats.e2e.observe(meta.queued.elapsed());
        if let (Some(first), n) = (first_token, g.tokens.len()) {
            if n > 1 {
                stats.tpot.observe(first.elapsed() / (n as u32 - 1));
            }
        }
        self.core.health.finished_one();
        self.core.forget(id);
        let _enter = meta.span.enter();
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
        let event = match g.error {
            Some(e) => {
                tracing::warn!(error = %e, "the sequence ended early");
                Event::Error(e)
            }
            None => Event::Done(summary),
        };
        let _ = meta.events.send((meta.index, event));
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let cols = self.model.layout().kv_cols();
        inputs
            .iter()
            .map(|ids| {
                self.core.health.beat();
                let mut cache = ContiguousKvCache::new(&self.backend, self.model.config.n_layers, cols, ids.len())
                    .map_err(|e| e.to_string())?;
                self.core.stats.prompt_tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
                self.model.embed_mean(&self.backend, ids, &mut cache).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// A two-token generation through the batched path (prefill of a short prompt, then one
    /// decode step), so the first real request finds every buffer, page and thread warm. It
    /// counts in no statistic, and its blocks go straight back to the pool.
    fn warm_up(&self, cache: &mut PagedKvCache<B>) -> Result<Duration, String> {
        let t = Instant::now();
        let vocab = self.model.config.vocab_size as u32;
        // A prompt as long as a typical short request (one prefill of up to 64 tokens) so the
        // buffers a real prefill needs are grown once here. Its full blocks enter the prefix
        // cache like any freed block's; nothing real starts with this text.
        let mut hello: Vec<u32> = self.tokenizer.encode("Hello, warm-up.", false).unwrap_or_default();
        hello.retain(|&id| id < vocab);
        if hello.is_empty() {
            hello.push(0);
        }
        let len = 64.min(self.max_batched_tokens).min(self.context_length.saturating_sub(2)).max(1);
        let ids: Vec<u32> = hello.iter().copied().cycle().take(len).collect();
        let (mut seq, _) = cache.start(&ids, ids.len() + 1);
        let result = (|| {
            let logits = self.model.forward_batch(&self.backend, cache, &mut [(&ids[..], &mut seq)])?;
            let next = logits[0]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
                .min(vocab - 1);
            self.model.forward_batch(&self.backend, cache, &mut [(&[next][..], &mut seq)])
        })();
        cache.free(&mut seq);
        result.map_err(|e| format!("warm-up failed: {e}"))?;
        Ok(t.elapsed())
    }
}
