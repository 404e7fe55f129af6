//! The model manager: which models are resident, under a memory budget.
//!
//! - Pinned models (loaded at start: the chat model, for voice) stay whatever requests say; an
//!   explicit unload still unloads them, and `/health` then says so.
//! - Other models load the first time a request names them, once (concurrent first requests
//!   wait for the same load), and unload after `keep_alive` idle time with Ollama's semantics:
//!   the default 5 m, `0` unloads now (a load request) or as soon as the request is done, a
//!   negative value keeps the model for good. Idle time counts from the later of the last
//!   request's arrival and the last generation's end; a busy model never expires.
//! - A load that would take the resident models past the budget first evicts the least recently
//!   used unpinned models (idle ones before busy ones; a busy one finishes what it holds before
//!   its memory is freed). If pinned models leave no room, the load gets 503 with the numbers.
//!   A model's cost before loading is its files plus `kv_cache_bytes` (an upper bound); once
//!   loaded, its weights plus the KV cache it allocated.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::error::ApiError;
use crate::backend::cpu::Precision;
use crate::engine::service::{EngineConfig, ModelHandle};
use crate::hub::{HubError, Manifest, PullOptions, Store};
use crate::model::loaded::AnyModel;
use crate::server::infer::submit_error;

/// Where model files come from: the store on a real box, fixtures in tests.
pub trait ModelSource: Send + Sync + 'static {
    /// Every file of `m` is in place and verified.
    fn present(&self, m: &Manifest) -> bool;
    /// Total bytes of `m`'s files on disk.
    fn size(&self, m: &Manifest) -> u64;
    fn modified(&self, m: &Manifest) -> SystemTime;
    /// The primary file's sha256 (lowercase hex), for `digest` fields.
    fn digest(&self, m: &Manifest) -> String;
    fn load(&self, m: &Manifest) -> Result<AnyModel, String>;
    fn pull(&self, m: &Manifest, opts: &PullOptions) -> Result<(), HubError>;
    fn delete(&self, m: &Manifest) -> Result<(), String>;
}

/// Models in the store, loaded on the CPU engine.
pub struct StoreSource {
    pub store: Store,
    pub threads: usize,
    pub precision: Precision,
}

impl ModelSource for StoreSource {
    fn present(&self, m: &Manifest) -> bool {
        self.store.is_present(m)
    }

    fn size(&self, m: &Manifest) -> u64 {
        m.files.iter().filter_map(|f| std::fs::metadata(self.store.file_path(m, f)).ok()).map(|md| md.len()).sum()
    }

    fn modified(&self, m: &Manifest) -> SystemTime {
        std::fs::metadata(self.store.primary_path(m)).and_then(|md| md.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn digest(&self, m: &Manifest) -> String {
        m.primary().sha256.clone().unwrap_or_default()
    }

    fn load(&self, m: &Manifest) -> Result<AnyModel, String> {
        let path = self.store.primary_path(m);
        AnyModel::load(m, &path, self.threads, self.precision).map_err(|e| e.to_string())
    }

    fn pull(&self, m: &Manifest, opts: &PullOptions) -> Result<(), HubError> {
        crate::hub::pull(m, &self.store, opts).map(|_| ())
    }

    fn delete(&self, m: &Manifest) -> Result<(), String> {
        let dir: PathBuf = self.store.model_dir(m);
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))
    }
}

struct Resident {
    handle: Arc<ModelHandle>,
    /// `None`: kept forever (negative keep_alive, or pinned).
    keep_alive: Option<Duration>,
    /// The last request that named it (also the LRU order).
    touched: Instant,
}

impl Resident {
    /// When it expires if it stays idle; `None` never.
    fn deadline(&self) -> Option<Instant> {
        let idle_from = self.touched.max(self.handle.health.last_finish());
        self.keep_alive.map(|ka| idle_from + ka)
    }
}

pub struct Engines {
    source: Arc<dyn ModelSource>,
    resident: Mutex<HashMap<String, Resident>>,
    pinned: Mutex<HashSet<String>>,
    load_lock: tokio::sync::Mutex<()>,
    engine: EngineConfig,
    pub default_keep_alive: Duration,
    /// Bytes the resident models may hold together.
    pub budget: u64,
}

/// A keep-alive as Ollama means it: `Some(d)` keeps the model `d` after use, `None` forever.
pub type KeepAlive = Option<Duration>;

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

impl Engines {
    pub fn new(source: Arc<dyn ModelSource>, engine: EngineConfig, default_keep_alive: Duration, budget: u64) -> Self {
        Self {
            source,
            resident: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashSet::new()),
            load_lock: tokio::sync::Mutex::new(()),
            engine,
            default_keep_alive,
            budget,
        }
    }

    /// Marks `id` as pinned: it never expires and is never evicted.
    pub fn pin(&self, id: &str) {
        self.pinned.lock().unwrap().insert(id.to_owned());
        if let Some(r) = self.resident.lock().unwrap().get_mut(id) {
            r.keep_alive = None;
        }
    }

    /// Pinned model ids, sorted.
    pub fn pinned(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pinned.lock().unwrap().iter().cloned().collect();
        v.sort();
        v
    }

    fn is_pinned(&self, id: &str) -> bool {
        self.pinned.lock().unwrap().contains(id)
    }

    pub fn source(&self) -> &dyn ModelSource {
        &*self.source
    }

    /// The loaded model for `m`, loading it first if needed (evicting others to make room). A
    /// model that has failed or stalled is an error with the reason. `requested` is the name the
    /// client used (for the not-found text). Returns the handle and the time this call spent
    /// loading.
    pub async fn get(
        &self,
        m: &Manifest,
        requested: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<(Arc<ModelHandle>, Duration), ApiError> {
        let start = Instant::now();
        if let Some(h) = self.touch(&m.id, keep_alive)? {
            return Ok((h, Duration::ZERO));
        }
        let _guard = self.load_lock.lock().await;
        if let Some(h) = self.touch(&m.id, keep_alive)? {
            return Ok((h, start.elapsed()));
        }
        if !self.source.present(m) {
            return Err(ApiError::ModelNotFound { model: requested.to_owned() });
        }
        let source = self.source.clone();
        let manifest = m.clone();
        let weights = tokio::task::spawn_blocking(move || source.size(&manifest))
            .await
            .map_err(|e| ApiError::Internal(format!("sizing model '{}': {e}", m.id)))?;
        self.make_room(&m.id, weights, weights + self.engine.kv_cache_bytes as u64)?;
        let source = self.source.clone();
        let manifest = m.clone();
        let engine = self.engine.clone();
        // File I/O and the load stay off the async threads.
        let handle = tokio::task::spawn_blocking(move || {
            let id = manifest.id.clone();
            let tools = manifest.has_role(crate::hub::Role::Tools);
            let loader = Box::new(move || source.load(&manifest));
            let handle = ModelHandle::start(&id, loader, weights, &engine)?;
            if tools {
                // Part of warming up a tool model: its first constrained request (a forced tool
                // choice) then pays only its own schema's compile, not the token trie.
                crate::engine::grammar::prepare_vocabulary(&handle.tokenizer);
            }
            Ok::<_, String>(handle)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("loading model '{}' panicked: {e}", m.id)))?
        .map_err(|e| ApiError::Internal(format!("loading model '{}' failed: {e}", m.id)))?;
        tracing::info!(
            model = %m.id,
            ms = handle.load_duration.as_millis() as u64,
            mib = mib(handle.size_bytes()),
            "model loaded"
        );
        let handle = Arc::new(handle);
        let keep_alive = self.keep_alive_for(&m.id, keep_alive);
        self.resident
            .lock()
            .unwrap()
            .insert(m.id.clone(), Resident { handle: handle.clone(), keep_alive, touched: Instant::now() });
        Ok((handle, start.elapsed()))
    }

    /// Evicts least recently used unpinned models until `need` more bytes fit the budget.
    fn make_room(&self, id: &str, weights: u64, need: u64) -> Result<(), ApiError> {
        loop {
            let used = self.memory_used();
            if used + need <= self.budget {
                return Ok(());
            }
            let victim = {
                let resident = self.resident.lock().unwrap();
                resident
                    .iter()
                    .filter(|(rid, _)| !self.is_pinned(rid))
                    .min_by_key(|(_, r)| (r.handle.busy(), r.touched))
                    .map(|(rid, _)| rid.clone())
            };
            match victim {
                Some(v) => {
                    tracing::info!(evicted = %v, to_load = %id, "evicting the least recently used model to make room");
                    self.unload(&v);
                }
                None => {
                    let held: Vec<String> = self
                        .resident()
                        .iter()
                        .map(|(h, _)| format!("'{}' ({} MiB)", h.id, mib(h.size_bytes())))
                        .collect();
                    return Err(ApiError::Unavailable(format!(
                        "model '{id}' needs about {} MiB (weights {} MiB + KV cache {} MiB) but the memory budget is {} MiB{}",
                        mib(need),
                        mib(weights),
                        mib(need - weights),
                        mib(self.budget),
                        if held.is_empty() {
                            String::new()
                        } else {
                            format!(" and pinned models hold {} MiB: {}", mib(used), held.join(", "))
                        }
                    )));
                }
            }
        }
    }

    /// The resident handle of `id`, its keep-alive renewed — or the reason it cannot serve
    /// (failed, stalled), without renewing anything, so that a failed model still expires.
    fn touch(&self, id: &str, keep_alive: Option<KeepAlive>) -> Result<Option<Arc<ModelHandle>>, ApiError> {
        let keep_alive = self.keep_alive_for(id, keep_alive);
        let mut resident = self.resident.lock().unwrap();
        let Some(r) = resident.get_mut(id) else { return Ok(None) };
        r.handle.available().map_err(submit_error)?;
        r.keep_alive = keep_alive;
        r.touched = Instant::now();
        Ok(Some(r.handle.clone()))
    }

    fn keep_alive_for(&self, id: &str, keep_alive: Option<KeepAlive>) -> KeepAlive {
        if self.is_pinned(id) {
            return None;
        }
        keep_alive.unwrap_or(Some(self.default_keep_alive))
    }

    /// Drops the model from the resident set (its engine ends after the sequences it holds).
    pub fn unload(&self, id: &str) -> bool {
        let gone = self.resident.lock().unwrap().remove(id);
        if gone.is_some() {
            tracing::info!(model = %id, "model unloaded");
        }
        gone.is_some()
    }

    /// Unloads every unpinned model whose keep-alive has run out while idle; returns their ids.
    pub fn reap(&self) -> Vec<String> {
        let now = Instant::now();
        let expired: Vec<String> = self
            .resident
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, r)| !self.is_pinned(id) && r.deadline().is_some_and(|d| d <= now) && !r.handle.busy())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::info!(model = %id, "keep_alive expired");
            self.unload(id);
        }
        expired
    }

    pub fn is_loaded(&self, id: &str) -> bool {
        self.resident.lock().unwrap().contains_key(id)
    }

    pub fn handle(&self, id: &str) -> Option<Arc<ModelHandle>> {
        self.resident.lock().unwrap().get(id).map(|r| r.handle.clone())
    }

    /// Bytes the resident models hold (a failed model's engine has released its memory).
    pub fn memory_used(&self) -> u64 {
        self.resident.lock().unwrap().values().filter(|r| r.handle.holds_memory()).map(|r| r.handle.size_bytes()).sum()
    }

    /// Loaded models with their expiry, latest expiry first (as `/api/ps` sorts).
    pub fn resident(&self) -> Vec<(Arc<ModelHandle>, Option<SystemTime>)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .resident
            .lock()
            .unwrap()
            .values()
            .map(|r| (r.handle.clone(), r.deadline().map(|d| SystemTime::now() + d.saturating_duration_since(now))))
            .collect();
        v.sort_by(|a, b| match (a.1, b.1) {
            (None, None) => a.0.id.cmp(&b.0.id),
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => y.cmp(&x).then_with(|| a.0.id.cmp(&b.0.id)),
        });
        v
    }
}

/// Unloads expired models every second until the server stops.
pub fn spawn_reaper(state: super::Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            state.engines.reap();
        }
    })
}
