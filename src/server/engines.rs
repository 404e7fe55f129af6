//! Which models are loaded, and loading on demand.
//!
//! A model is loaded the first time a request names it (or at start for `preload`), once:
//! concurrent first requests wait for the same load. `keep_alive` is recorded for `/api/ps`;
//! `keep_alive: 0` on a load request unloads at once. Timed expiry, memory budgets and LRU
//! eviction arrive with the engine-core issue's model manager; until then a loaded model stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::error::ApiError;
use crate::backend::cpu::{CpuBackend, Precision};
use crate::engine::service::{EngineConfig, ModelHandle};
use crate::hub::{Format, HubError, Manifest, PullOptions, Store};
use crate::model::loaded::LoadedModel;

/// Where model files come from: the store on a real box, fixtures in tests.
pub trait ModelSource: Send + Sync + 'static {
    /// Every file of `m` is in place and verified.
    fn present(&self, m: &Manifest) -> bool;
    /// Total bytes of `m`'s files on disk.
    fn size(&self, m: &Manifest) -> u64;
    fn modified(&self, m: &Manifest) -> SystemTime;
    /// The primary file's sha256 (lowercase hex), for `digest` fields.
    fn digest(&self, m: &Manifest) -> String;
    fn load(&self, m: &Manifest) -> Result<LoadedModel<CpuBackend>, String>;
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

    fn load(&self, m: &Manifest) -> Result<LoadedModel<CpuBackend>, String> {
        let path = self.store.primary_path(m);
        LoadedModel::load(m, &path, self.threads, self.precision).map_err(|e| e.to_string())
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
    /// `None`: kept forever (negative keep_alive).
    expires_at: Option<SystemTime>,
}

pub struct Engines {
    source: Arc<dyn ModelSource>,
    resident: Mutex<HashMap<String, Resident>>,
    /// Models loaded at start: kept regardless of requests' `keep_alive` (an explicit unload
    /// still unloads them, and `/health` then says so).
    pinned: Mutex<std::collections::HashSet<String>>,
    load_lock: tokio::sync::Mutex<()>,
    engine: EngineConfig,
    pub default_keep_alive: Duration,
}

/// A keep-alive as Ollama means it: `Some(d)` keeps the model `d` after use, `None` forever.
pub type KeepAlive = Option<Duration>;

impl Engines {
    pub fn new(source: Arc<dyn ModelSource>, engine: EngineConfig, default_keep_alive: Duration) -> Self {
        Self {
            source,
            resident: Mutex::new(HashMap::new()),
            pinned: Mutex::new(std::collections::HashSet::new()),
            load_lock: tokio::sync::Mutex::new(()),
            engine,
            default_keep_alive,
        }
    }

    /// Marks `id` as pinned: its expiry stays "never" whatever requests say.
    pub fn pin(&self, id: &str) {
        self.pinned.lock().unwrap().insert(id.to_owned());
        if let Some(r) = self.resident.lock().unwrap().get_mut(id) {
            r.expires_at = None;
        }
    }

    pub fn source(&self) -> &dyn ModelSource {
        &*self.source
    }

    /// The loaded model for `m`, loading it first if needed. `requested` is the name the client
    /// used (for the not-found text). Returns the handle and the time this call spent loading.
    pub async fn get(
        &self,
        m: &Manifest,
        requested: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<(Arc<ModelHandle>, Duration), ApiError> {
        let start = Instant::now();
        if let Some(h) = self.touch(&m.id, keep_alive) {
            return Ok((h, Duration::ZERO));
        }
        let _guard = self.load_lock.lock().await;
        if let Some(h) = self.touch(&m.id, keep_alive) {
            return Ok((h, start.elapsed()));
        }
        if m.format != Format::Gguf {
            return Err(ApiError::NotImplemented(format!(
                "model '{}' is {:?}, which needs the CUDA engine; this build runs GGUF models on the CPU only",
                m.id, m.format
            )));
        }
        if !self.source.present(m) {
            return Err(ApiError::ModelNotFound { model: requested.to_owned() });
        }
        let source = self.source.clone();
        let manifest = m.clone();
        let engine = self.engine.clone();
        // File I/O (sizes, the load) stays off the async threads.
        let handle = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let loaded = source.load(&manifest)?;
            ModelHandle::start(loaded, source.size(&manifest), t.elapsed(), &engine)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("loading model '{}' panicked: {e}", m.id)))?
        .map_err(|e| ApiError::Internal(format!("loading model '{}' failed: {e}", m.id)))?;
        tracing::info!(model = %m.id, ms = handle.load_duration.as_millis() as u64, "model loaded");
        let handle = Arc::new(handle);
        let expires_at = self.expiry(&m.id, keep_alive);
        self.resident.lock().unwrap().insert(m.id.clone(), Resident { handle: handle.clone(), expires_at });
        Ok((handle, start.elapsed()))
    }

    fn touch(&self, id: &str, keep_alive: Option<KeepAlive>) -> Option<Arc<ModelHandle>> {
        let expires_at = self.expiry(id, keep_alive);
        let mut resident = self.resident.lock().unwrap();
        let r = resident.get_mut(id)?;
        r.expires_at = expires_at;
        Some(r.handle.clone())
    }

    fn expiry(&self, id: &str, keep_alive: Option<KeepAlive>) -> Option<SystemTime> {
        if self.pinned.lock().unwrap().contains(id) {
            return None;
        }
        keep_alive.unwrap_or(Some(self.default_keep_alive)).map(|d| SystemTime::now() + d)
    }

    /// Drops the model from the resident set (the engine thread ends after its current job).
    pub fn unload(&self, id: &str) -> bool {
        self.resident.lock().unwrap().remove(id).is_some()
    }

    pub fn is_loaded(&self, id: &str) -> bool {
        self.resident.lock().unwrap().contains_key(id)
    }

    /// Loaded models with their expiry, latest expiry first (as `/api/ps` sorts).
    pub fn resident(&self) -> Vec<(Arc<ModelHandle>, Option<SystemTime>)> {
        let mut v: Vec<_> = self.resident.lock().unwrap().values().map(|r| (r.handle.clone(), r.expires_at)).collect();
        v.sort_by(|a, b| match (a.1, b.1) {
            (None, None) => a.0.id.cmp(&b.0.id),
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => y.cmp(&x),
        });
        v
    }
}
