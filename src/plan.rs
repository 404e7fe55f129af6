//! The hardware plan: what this box serves, decided once at start from the probe's report and the
//! config. [`plan`] is a pure function (no files, no clock, no build features), so every board is
//! tested from its fixture report.
//!
//! Defaults by board (the config overrides every one of them):
//! - **Jetson Orin** → the CUDA engine with the three AWQ models (chat/voice, tools, vision). The
//!   memory is unified: the budget is MemTotal minus a reserve for the OS, the desktop and the
//!   CUDA runtime ([`jetson_reserve`]). All three are pinned when they fit with at least
//!   [`KV_FIT_ALL`] of KV cache each (AGX Orin 32/64 GB); else the chat model is pinned and the
//!   others that fit beside it are loaded on demand, one at a time (Orin NX 16 GB). A module where
//!   even the chat model does not fit (Orin Nano 4 GB) serves the default model on the CPU and
//!   says why.
//! - **Raspberry Pi** → proxy to an Ollama (`http://127.0.0.1:11435` unless the config names
//!   one: zoe-llm holds 11434); nothing is loaded locally.
//! - **Another box with a usable NVIDIA GPU** → the CUDA engine; GPU memory is not in the files the
//!   probe reads, so the chat model is pinned and the others load on demand unless the config
//!   gives a budget.
//! - **CPU only** (and anything unknown or unreadable) → the CPU engine with the registry's
//!   default model (SmolLM2-135M), so a fresh machine serves at once.
//!
//! Every decision is written to `notes`, which `serve` logs once and `probe` prints.

use provider_probe::{Family, Report};
use serde::{Deserialize, Serialize};

use crate::hub::{Format, Manifest, Registry, Role};
use crate::provider::{UpstreamConfig, UpstreamKind};
use crate::server::ServeConfig;

/// Which engine serves: a config value (`backend = "cuda"`) and the plan's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The CUDA engine (AWQ models); GGUF models still run on the CPU.
    Cuda,
    /// The CPU engine.
    Cpu,
    /// Requests go to an upstream Ollama; nothing is loaded at start.
    OllamaProxy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cuda => "cuda",
            Backend::Cpu => "cpu",
            Backend::OllamaProxy => "ollama-proxy",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub backend: Backend,
    /// Bytes the resident models (weights + KV cache) may hold together.
    pub memory_budget_bytes: u64,
    /// Model ids loaded at start and never evicted.
    pub pinned: Vec<String>,
    /// Model ids expected to load on request (and be evicted when idle or when room is needed).
    pub on_demand: Vec<String>,
    /// Sequences decoded together per model.
    pub max_num_seqs: usize,
    /// KV cache per model.
    pub kv_cache_bytes: usize,
    /// Upstream servers: the config's, plus the default Ollama of the Raspberry Pi plan.
    pub upstreams: Vec<UpstreamConfig>,
    /// Why each decision was made, in order.
    pub notes: Vec<String>,
}

/// Sequences decoded together when neither the config nor the plan says otherwise (the CUDA
/// engine's design point).
pub const DEFAULT_MAX_NUM_SEQS: usize = 8;
/// KV cache per model on the CPU and wherever the plan has no better number.
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 << 20;
/// Least KV cache a model is given: 256 MiB holds about 2,300 tokens of Llama-3.2-3B (112 KiB a
/// token in fp16) and 4,600 of a Qwen2-7B (56 KiB).
pub const KV_MIN: u64 = 256 << 20;
/// KV cache each model must get for all three to be pinned.
pub const KV_FIT_ALL: u64 = 1 << 30;
/// Most KV cache the plan gives one model (about 37k tokens of Llama-3.2-3B).
pub const KV_MAX: u64 = 4 << 30;
/// Memory assumed when MemTotal could not be read.
pub const ASSUMED_MEMORY: u64 = 8 << 30;
/// Upstream the Raspberry Pi plan adds when the config names no Ollama.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11435";

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// Memory a Jetson keeps out of the model budget: 1/8 of it, at least 1.5 GiB and at most 4 GiB.
/// It covers what shares the unified memory besides the models: the OS and JetPack's desktop
/// (about 1 GB on a developer kit), the CUDA context and cuBLAS handles (a few hundred MB), image
/// preprocessing and request buffers, and room for the page cache so model files load without
/// thrashing. 1.5 GiB is what a headless Orin Nano 8 GB can spare; bigger modules run more beside.
pub fn jetson_reserve(total: u64) -> u64 {
    (total / 8).clamp(3 << 29, 4 << 30)
}

/// The plan for this box. Pure: the same report, config and registry give the same plan.
pub fn plan(report: &Report, config: &ServeConfig, registry: &Registry) -> Plan {
    let mut notes = Vec::new();
    let total = report.memory.total_bytes.unwrap_or_else(|| {
        notes.push(format!("memory size unknown: assuming {}", gib(ASSUMED_MEMORY)));
        ASSUMED_MEMORY
    });
    let suggested = suggest_backend(report, &mut notes);
    let backend = match config.backend {
        Some(b) if b != suggested => {
            notes.push(format!(
                "backend {}: set by the config (the probe suggests {})",
                b.as_str(),
                suggested.as_str()
            ));
            if b == Backend::Cuda && !report.cuda.available {
                notes.push(format!(
                    "warning: CUDA is not available here ({}); AWQ models will run on the CPU (exact, slow)",
                    report.cuda.reason.as_deref().unwrap_or("unknown reason")
                ));
            }
            b
        }
        _ => suggested,
    };
    let mut p = Plan {
        backend,
        memory_budget_bytes: 0,
        pinned: Vec::new(),
        on_demand: Vec::new(),
        max_num_seqs: config.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS),
        kv_cache_bytes: config.kv_cache_bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES),
        upstreams: config.upstreams.clone(),
        notes,
    };
    // The budget: the config's, else unified memory minus the reserve on a Jetson, else 80%.
    let unified = report.memory.unified && report.board.family == Family::JetsonOrin;
    p.memory_budget_bytes = match config.memory_budget_bytes {
        Some(b) => {
            p.notes.push(format!("memory budget {}: set by the config", gib(b)));
            b
        }
        None if unified && backend == Backend::Cuda => {
            let reserve = jetson_reserve(total);
            let budget = total.saturating_sub(reserve);
            p.notes.push(format!(
                "memory budget {}: {} of unified memory minus {} for the OS, desktop and CUDA runtime (1/8, within 1.5–4 GiB)",
                gib(budget),
                gib(total),
                gib(reserve)
            ));
            budget
        }
        None => total / 5 * 4,
    };
    match backend {
        Backend::OllamaProxy => proxy_plan(&mut p),
        Backend::Cuda => cuda_plan(&mut p, config, registry, unified),
        Backend::Cpu => default_model_plan(&mut p, registry),
    }
    apply_model_overrides(&mut p, config, registry);
    p
}

/// The backend the hardware suggests, with the reason.
fn suggest_backend(report: &Report, notes: &mut Vec<String>) -> Backend {
    let board = report.board.model.as_deref().unwrap_or("unknown board");
    let variant = report.board.variant.as_deref().map(|v| format!(" ({v})")).unwrap_or_default();
    match report.board.family {
        Family::RaspberryPi => {
            notes.push(format!("{board}{variant}: a Raspberry Pi proxies an Ollama server"));
            Backend::OllamaProxy
        }
        Family::JetsonOrin if report.cuda.available => {
            notes.push(format!("{board}{variant}: Jetson Orin, CUDA engine with the AWQ models"));
            Backend::Cuda
        }
        Family::JetsonOrin => {
            notes.push(format!(
                "{board}{variant}: Jetson Orin, but CUDA is not available ({}); CPU engine",
                report.cuda.reason.as_deref().unwrap_or("unknown reason")
            ));
            Backend::Cpu
        }
        // Older Jetsons (Xavier = sm_72, TX2, Nano) have CUDA but not the sm_80+ our kernels need.
        Family::Generic if report.board.soc.as_deref().is_some_and(|s| s.starts_with("tegra")) => {
            notes.push(format!(
                "{board}: a pre-Orin Tegra ({}): the CUDA kernels need an Ampere GPU (sm_80 or later); CPU engine",
                report.board.soc.as_deref().unwrap_or("?")
            ));
            Backend::Cpu
        }
        Family::Generic if report.cuda.available => {
            let gpus: Vec<&str> = report.cuda.devices.iter().map(|d| d.name.as_str()).collect();
            notes.push(format!(
                "{board}: NVIDIA GPU ({}), CUDA engine (the kernels need sm_80 or later; older GPUs fall back to the CPU at load)",
                gpus.join(", ")
            ));
            Backend::Cuda
        }
        Family::Generic => {
            notes.push(format!(
                "{board}: no usable NVIDIA GPU ({}); CPU engine",
                report.cuda.reason.as_deref().unwrap_or("none found")
            ));
            Backend::Cpu
        }
    }
}

fn proxy_plan(p: &mut Plan) {
    if !p.upstreams.iter().any(|u| u.kind == UpstreamKind::Ollama) {
        let name = if p.upstreams.iter().any(|u| u.name == "ollama") { "ollama-default" } else { "ollama" };
        p.upstreams.push(UpstreamConfig::new(name, UpstreamKind::Ollama, DEFAULT_OLLAMA_URL));
        p.notes.push(format!(
            "upstream {name:?}: the Ollama at {DEFAULT_OLLAMA_URL} (move Ollama off 11434, which zoe-llm holds: OLLAMA_HOST=127.0.0.1:11435)"
        ));
    }
    p.notes.push("nothing is loaded locally".into());
}

/// The registry's default model, pinned (the CPU plan, and the fallback of the others).
fn default_model_plan(p: &mut Plan, registry: &Registry) {
    match registry.default_model() {
        Some(m) => {
            p.pinned = vec![m.id.clone()];
            p.notes.push(format!("pinned: {} (the default model)", m.id));
        }
        None => p.notes.push("the registry has no default model: nothing pinned".into()),
    }
}

/// The AWQ models by role, in pinning order: chat/voice, tools, vision.
fn awq_models(registry: &Registry) -> Vec<&Manifest> {
    let awq = |role: Role| registry.with_role(role).find(|m| m.format == Format::AwqSafetensors);
    let mut out: Vec<&Manifest> = Vec::new();
    for m in [awq(Role::Voice).or_else(|| awq(Role::Chat)), awq(Role::Tools), awq(Role::Vision)].into_iter().flatten() {
        if !out.iter().any(|o| o.id == m.id) {
            out.push(m);
        }
    }
    out
}

fn size_of(m: &Manifest, notes: &mut Vec<String>) -> u64 {
    m.resident_estimate().unwrap_or_else(|| {
        notes.push(format!("{}: size unknown (no resident_bytes or file sizes); counted as 0", m.id));
        0
    })
}

fn cuda_plan(p: &mut Plan, config: &ServeConfig, registry: &Registry, unified: bool) {
    let models = awq_models(registry);
    if models.is_empty() {
        p.notes.push("the registry has no AWQ models for the CUDA engine".into());
        return default_model_plan(p, registry);
    }
    let sizes: Vec<u64> = models.iter().map(|m| size_of(m, &mut p.notes)).collect();
    let budget = p.memory_budget_bytes;
    let kv_fixed = config.kv_cache_bytes.map(|k| k as u64);
    // A discrete GPU's memory is not in the files: without a configured budget, pin only the chat
    // model rather than guess that everything fits.
    let may_pin_all = unified || config.memory_budget_bytes.is_some();
    if !may_pin_all {
        p.notes.push(
            "GPU memory is not known from the probe: the budget is 80% of system memory; set memory_budget_bytes to \
             what the GPU holds to pin more"
                .into(),
        );
    }
    let sum: u64 = sizes.iter().sum();
    let n = models.len() as u64;
    let share = budget.saturating_sub(sum) / n;
    if may_pin_all && share >= kv_fixed.unwrap_or(KV_FIT_ALL) {
        p.pinned = models.iter().map(|m| m.id.clone()).collect();
        p.kv_cache_bytes = kv_fixed.unwrap_or(share.min(KV_MAX)) as usize;
        p.notes.push(format!(
            "pinned all {n} AWQ models ({} of weights, {} KV cache each, budget {})",
            gib(sum),
            gib(p.kv_cache_bytes as u64),
            gib(budget)
        ));
        return;
    }
    let (chat, chat_size) = (models[0], sizes[0]);
    if chat_size + kv_fixed.unwrap_or(KV_MIN) > budget {
        p.notes.push(format!(
            "{} needs {} + KV cache, more than the {} budget: serving the default model on the CPU instead \
             (override with preload and memory_budget_bytes)",
            chat.id,
            gib(chat_size),
            gib(budget)
        ));
        p.backend = Backend::Cpu;
        return default_model_plan(p, registry);
    }
    p.pinned = vec![chat.id.clone()];
    // Each other model loads on request beside the pinned one (one at a time: the manager evicts
    // the idle one first); it is offered only if it fits there with the least KV cache.
    let mut largest = 0;
    for (m, &size) in models.iter().zip(&sizes).skip(1) {
        let kv = kv_fixed.unwrap_or(KV_MIN);
        if chat_size + size + 2 * kv <= budget {
            p.on_demand.push(m.id.clone());
            largest = largest.max(size);
        } else {
            p.notes.push(format!(
                "{} ({}) does not fit beside the pinned {} ({}) in the {} budget: not offered (unpin {} or raise \
                 memory_budget_bytes)",
                m.id,
                gib(size),
                chat.id,
                gib(chat_size),
                gib(budget),
                chat.id
            ));
        }
    }
    let resident = if largest > 0 { 2 } else { 1 };
    let share = budget.saturating_sub(chat_size + largest) / resident;
    // Without the GPU's size, the share of a system-memory budget means nothing: keep the default.
    let planned = if may_pin_all { share.clamp(KV_MIN, KV_MAX) } else { DEFAULT_KV_CACHE_BYTES as u64 };
    p.kv_cache_bytes = kv_fixed.unwrap_or(planned) as usize;
    p.notes.push(format!(
        "pinned {} ({}); {} on demand; KV cache {} per model",
        chat.id,
        gib(chat_size),
        if p.on_demand.is_empty() { "nothing else".to_owned() } else { p.on_demand.join(", ") },
        gib(p.kv_cache_bytes as u64)
    ));
}

/// `preload` / `on_demand` from the config (and `-m`, which `serve` writes into `preload`)
/// replace the plan's lists; names become ids where the registry knows them.
fn apply_model_overrides(p: &mut Plan, config: &ServeConfig, registry: &Registry) {
    let ids = |names: &[String], notes: &mut Vec<String>| -> Vec<String> {
        names
            .iter()
            .map(|n| match registry.get(n) {
                Some(m) => m.id.clone(),
                None => {
                    notes.push(format!("warning: {n:?} is not a known model"));
                    n.clone()
                }
            })
            .collect()
    };
    if !config.preload.is_empty() {
        p.pinned = ids(&config.preload, &mut p.notes);
        p.notes.push(format!("pinned: {} (set by the config)", p.pinned.join(", ")));
        // What the plan would have loaded on demand stays on demand, less what is now pinned.
        if config.on_demand.is_empty() && p.backend == Backend::Cuda {
            p.on_demand =
                awq_models(registry).iter().map(|m| m.id.clone()).filter(|id| !p.pinned.contains(id)).collect();
        }
    }
    if !config.on_demand.is_empty() {
        p.on_demand = ids(&config.on_demand, &mut p.notes);
        p.notes.push(format!("on demand: {} (set by the config)", p.on_demand.join(", ")));
    }
    p.on_demand.retain(|id| !p.pinned.contains(id));
    if let Some(n) = config.max_num_seqs {
        p.notes.push(format!("max_num_seqs {n}: set by the config"));
    }
    if let Some(kv) = config.kv_cache_bytes {
        p.notes.push(format!("kv_cache_bytes {}: set by the config", gib(kv as u64)));
    }
}

impl Plan {
    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let list = |l: &[String]| if l.is_empty() { "none".to_owned() } else { l.join(", ") };
        let mut out = format!(
            "plan:     {} — budget {}, {} sequences, KV cache {} per model\n",
            self.backend.as_str(),
            gib(self.memory_budget_bytes),
            self.max_num_seqs,
            gib(self.kv_cache_bytes as u64)
        );
        out += &format!("pinned:   {}\n", list(&self.pinned));
        out += &format!("on demand: {}\n", list(&self.on_demand));
        for u in &self.upstreams {
            out += &format!("upstream: {} ({:?}) {}\n", u.name, u.kind, u.url);
        }
        for n in &self.notes {
            out += &format!("why:      {n}\n");
        }
        out
    }
}
