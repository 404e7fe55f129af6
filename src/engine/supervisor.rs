//! The supervisor: one thread per loaded model that runs its engine in a scoped thread, watches
//! the heartbeat, and restarts the engine when it fails.
//!
//! Each incarnation loads the model afresh (a failure may have left the backend in any state),
//! allocates its KV cache, warms up and serves. When it panics or returns a fatal error:
//! - every request it held that has streamed nothing (and was not retried before) goes into the
//!   next incarnation first, transparently; the others get an [`Event::Error`];
//! - jobs still in the queue stay there for the next incarnation;
//! - the restart waits `restart_backoff · 2^(failures-1)` (at most 30 s); more than
//!   `max_restarts` failures within [`FAILURE_WINDOW`] mark the model failed, and from then on
//!   everything that reaches the queue is answered with the reason.
//!
//! A stall (no heartbeat within `stall_timeout` while ready) cannot be undone from inside the
//! process — a thread cannot be killed — so the supervisor ends the stalled engine's requests
//! with an error, the handle refuses new ones, `/health` reports it, and the systemd watchdog
//! (which is only fed while every pinned engine is alive) restarts the process. If the engine
//! beats again, it is ready again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::batch;
use super::service::{
    stall_reason, EngineConfig, EngineHealth, EngineState, EngineStats, Event, Job, Loader, Meta, Ticket,
    FAILURE_WINDOW,
};
use crate::model::tokenizer::Tokenizer;

/// How often the supervisor looks at its engine.
const POLL: Duration = Duration::from_millis(10);
/// The longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the first incarnation reports once the model is ready.
pub(super) struct Init {
    pub tokenizer: Arc<Tokenizer>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub kv_bytes: u64,
    pub load_duration: Duration,
    pub warmup: Option<Duration>,
    pub vision: Option<Arc<crate::vision::Vision>>,
}

/// State shared by the handle, the supervisor and each engine incarnation.
pub(super) struct Core {
    pub id: String,
    pub stats: Arc<EngineStats>,
    pub health: Arc<EngineHealth>,
    pub inflight: Mutex<HashMap<u64, Entry>>,
    pub next_id: AtomicU64,
    /// The model has been ready at least once.
    pub ready_once: AtomicBool,
}

impl Core {
    pub fn new(id: &str, stats: Arc<EngineStats>, health: Arc<EngineHealth>) -> Self {
        Self {
            id: id.to_owned(),
            stats,
            health,
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            ready_once: AtomicBool::new(false),
        }
    }

    pub fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a job the engine holds (waiting for admission); returns its id.
    pub fn register(&self, ticket: Ticket) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.inflight().insert(id, Entry { ticket, phase: Phase::Waiting, answered: false });
        id
    }

    /// Moves a job to the counter `phase` stands for (the engine updates the counters itself).
    pub fn set_phase(&self, id: u64, phase: Phase) {
        if let Some(e) = self.inflight().get_mut(&id) {
            e.phase = phase;
        }
    }

    /// The job ended: the supervisor no longer answers for it.
    pub fn forget(&self, id: u64) {
        self.inflight().remove(&id);
    }

    /// Ends every job of a stalled engine with an error, once each: those it holds (they stay
    /// recorded, since the engine may still wake up and release them) and those queued behind it.
    fn answer_stalled(&self, queue: &Mutex<Queue>, message: &str) {
        for e in self.inflight().values_mut().filter(|e| !e.answered) {
            e.answered = true;
            self.fail(&e.ticket.meta, message);
        }
        // The engine takes the queue's lock only to receive, so a hung engine does not hold it.
        if let Ok(q) = queue.try_lock() {
            while let Ok((job, _, _)) = q.try_recv() {
                self.reject(job, message);
            }
        }
    }

    /// Answers a job from the queue with an error.
    fn reject(&self, job: Job, message: &str) {
        saturating_sub(&self.stats.waiting, 1);
        match job {
            Job::Generate(t) => self.fail(&t.meta, message),
            Job::Embed { reply, .. } => {
                let _ = reply.send(Err(message.to_owned()));
            }
        }
    }

    /// Ends a job with an error event.
    pub fn fail(&self, meta: &Meta, message: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        meta.span.in_scope(|| tracing::warn!(error = %message, "generation failed"));
        let _ = meta.events.send((meta.index, Event::Error(message.to_owned())));
    }
}

/// Where a recorded job stands, which says which counter holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Counted in `waiting` (admission queue, or preempted).
    Waiting,
    /// Counted in `running`.
    Running,
    /// No longer counted (its final events are being sent).
    Finishing,
}

/// A job the engine holds, as the supervisor records it.
pub(super) struct Entry {
    pub ticket: Ticket,
    pub phase: Phase,
    /// Its client already got an error (the engine stalled).
    pub answered: bool,
}

pub(super) type Queue = Receiver<(Job, Instant, tracing::Span)>;

fn saturating_sub(c: &std::sync::atomic::AtomicUsize, n: usize) {
    let _ = c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
}

pub(super) struct Supervisor {
    pub loader: Loader,
    pub config: EngineConfig,
    pub core: Arc<Core>,
}

impl Supervisor {
    pub fn run(mut self, rx: Receiver<(Job, Instant, tracing::Span)>, init: SyncSender<Result<Init, String>>) {
        let core = self.core.clone();
        let id = core.id.clone();
        let mut init = Some(init);
        let mut failures: VecDeque<Instant> = VecDeque::new();
        let mut carry: Vec<Ticket> = Vec::new();
        // The queue outlives every incarnation; a panicking one leaves the mutex poisoned, which
        // only means it held the lock.
        let rx = Mutex::new(rx);
        loop {
            core.health.set(EngineState::Starting);
            // Retries are recorded before anything can fail, so that a failed reload (or a
            // failed spawn) still answers them.
            let carried: Vec<(u64, Ticket)> =
                std::mem::take(&mut carry).into_iter().map(|t| (core.register(t.clone()), t)).collect();
            let outcome = std::thread::scope(|s| {
                let (loader, config, rx, core, init) = (&mut self.loader, &self.config, &rx, &*core, init.as_ref());
                let engine = std::thread::Builder::new()
                    .name(format!("engine-{id}"))
                    .spawn_scoped(s, move || {
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            batch::incarnation(loader, core, config, rx, carried, init)
                        }));
                        let r = r.unwrap_or_else(|payload| Err(panic_text(&*payload)));
                        // Said at once, before the supervisor notices the thread is gone.
                        if let Err(reason) = &r {
                            if core.ready_once.load(Ordering::SeqCst) {
                                core.health.set(EngineState::Restarting { attempt: 0, reason: reason.clone() });
                            }
                        }
                        r
                    })
                    .map_err(|e| format!("spawning the engine thread: {e}"))?;
                watch(core, config, rx, &engine);
                engine.join().unwrap_or_else(|payload| Err(panic_text(&*payload)))
            });
            let reason = match outcome {
                Ok(()) => {
                    core.health.set(EngineState::Stopped);
                    tracing::info!(model = %id, "engine stopped");
                    return;
                }
                Err(reason) => reason,
            };
            if !core.ready_once.load(Ordering::SeqCst) {
                // The first load failed: the caller gets the error; there is nothing to restart.
                core.health.set(EngineState::Failed { reason: reason.clone() });
                if let Some(tx) = init.take() {
                    let _ = tx.send(Err(reason));
                }
                return;
            }
            init = None;
            let now = Instant::now();
            failures.push_back(now);
            while failures.front().is_some_and(|&t| now.duration_since(t) > FAILURE_WINDOW) {
                failures.pop_front();
            }
            let giving_up = failures.len() as u32 > self.config.max_restarts;
            tracing::error!(model = %id, %reason, failures = failures.len(), "engine failed");
            // The state changes before any client hears of the failure, so whoever reacts to an
            // error event finds /health already saying so.
            let attempt = failures.len() as u32;
            if giving_up {
                let reason = format!(
                    "the engine failed {attempt} times within {} s; the last failure: {reason}",
                    FAILURE_WINDOW.as_secs()
                );
                tracing::error!(model = %id, %reason, "model marked failed");
                core.health.set(EngineState::Failed { reason: reason.clone() });
                self.recover(&reason, true);
                let message = format!("model '{id}' has failed: {reason}");
                // Answer whatever still arrives until the model is unloaded (the queue closes).
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                for (job, _, _) in rx.iter() {
                    core.reject(job, &message);
                }
                core.health.set(EngineState::Stopped);
                return;
            }
            core.health.set(EngineState::Restarting { attempt, reason: reason.clone() });
            core.health.restarts.fetch_add(1, Ordering::SeqCst);
            carry = self.recover(&reason, false);
            let delay = self.config.restart_backoff.saturating_mul(1 << (attempt - 1).min(16)).min(MAX_BACKOFF);
            tracing::warn!(model = %id, attempt, delay_ms = delay.as_millis() as u64, "restarting the engine");
            std::thread::sleep(delay);
        }
    }

    /// After a failed incarnation: the counters its jobs held are released, jobs that streamed
    /// nothing come back for one retry (unless `giving_up`), the rest get an error (unless a stall
    /// already answered them).
    fn recover(&self, reason: &str, giving_up: bool) -> Vec<Ticket> {
        let core = &self.core;
        let stats = &core.stats;
        let entries: Vec<Entry> = core.inflight().drain().map(|(_, e)| e).collect();
        for e in &entries {
            match e.phase {
                Phase::Waiting => saturating_sub(&stats.waiting, 1),
                Phase::Running => saturating_sub(&stats.running, 1),
                Phase::Finishing => {}
            }
        }
        stats.kv_blocks_used.store(0, Ordering::SeqCst);
        let mut carry = Vec::new();
        let message = if giving_up {
            format!("model '{}' has failed: {reason}", core.id)
        } else {
            format!("the engine for model '{}' failed mid-generation ({reason}); it is restarting", core.id)
        };
        for Entry { mut ticket, answered, .. } in entries {
            if answered {
                continue;
            }
            if ticket.meta.events.is_closed() {
                stats.finished_abort.fetch_add(1, Ordering::Relaxed);
            } else if !giving_up && !ticket.retried && !ticket.meta.streamed.load(Ordering::SeqCst) {
                ticket.retried = true;
                stats.retries.fetch_add(1, Ordering::Relaxed);
                ticket.meta.span.in_scope(|| tracing::info!("retrying after an engine failure (nothing was streamed)"));
                carry.push(ticket);
            } else {
                core.fail(&ticket.meta, &message);
            }
        }
        stats.waiting.fetch_add(carry.len(), Ordering::SeqCst);
        carry
    }
}

/// Polls until the engine thread ends; while it is stalled, ends its requests and those queued
/// behind it with an error.
fn watch<T>(core: &Core, config: &EngineConfig, queue: &Mutex<Queue>, engine: &std::thread::ScopedJoinHandle<'_, T>) {
    let mut stalled = false;
    while !engine.is_finished() {
        std::thread::sleep(POLL);
        let since = core.health.since_beat();
        let ready = core.health.raw_state() == EngineState::Ready;
        if ready && since > config.stall_timeout {
            let reason = stall_reason(since, config.stall_timeout);
            if !stalled {
                stalled = true;
                tracing::error!(model = %core.id, %reason, "engine stalled");
            }
            core.answer_stalled(queue, &format!("model '{}' is not responding: {reason}", core.id));
        } else if stalled && since <= config.stall_timeout {
            stalled = false;
            tracing::warn!(model = %core.id, "engine is stepping again");
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned());
    format!("the engine panicked: {text}")
}
