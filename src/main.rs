//! The `zoe-llm` command line. Everything it does is library code; this file parses flags,
//! wires the pieces and turns errors into one clear line and an exit code. Generated text goes
//! to stdout, everything else (progress, logs, timings) to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use zoe_llm::backend::cpu::Precision;
use zoe_llm::engine::generate::{generate, raw_prompt_ids, render_chat_prompt, FinishReason, GenerateRequest};
use zoe_llm::engine::sampler::SamplingParams;
use zoe_llm::hub::{ensure, pull, Format, Manifest, PullOptions, Registry, Store};
use zoe_llm::model::loaded::LoadedModel;

#[derive(Parser)]
#[command(name = "zoe-llm", version, about = "LLM appliance for the Zoe home assistant")]
struct Cli {
    /// Where models live (default: $ZOE_MODELS, else <data dir>/zoe-llm/models).
    #[arg(long, global = true, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// Log level for stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to PROMPT and stream it to stdout.
    Run(RunArgs),
    /// Download a model into the models directory and verify it.
    Pull {
        /// Model id or alias (see `zoe-llm list`).
        model: String,
        /// Accept large Hugging Face files whose sha256 cannot be verified.
        #[arg(long)]
        allow_unverified: bool,
    },
    /// List known models and whether they are present.
    List,
    /// Show what a running server has loaded (its /api/ps) and the state of its engines and
    /// upstreams (its /health).
    Ps {
        /// The server (default: $OLLAMA_HOST, else http://127.0.0.1:11434).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
    },
    /// Measure prompt-processing and decode throughput (llama-bench style).
    Bench(BenchArgs),
    /// Serve the Ollama and OpenAI APIs (default http://127.0.0.1:11434).
    Serve(ServeArgs),
    /// Probe the hardware and print the plan `serve` would follow.
    Probe {
        /// Read the files below DIR instead of this machine's (a fixture or a mounted image).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Print `{"report": …, "plan": …}` as JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// The `serve` config whose settings override the plan.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a `serve` config file and print the plan it gives on this machine.
    CheckConfig {
        file: PathBuf,
        /// Plan for the files below DIR instead of this machine.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Write a synthetic AWQ checkpoint (real names, shapes, packing and configs; random values).
    Synth {
        #[arg(long, value_enum)]
        arch: zoe_llm::model::synth::SynthArch,
        /// Directory to write (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on (default 127.0.0.1, or the config file's).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (default 11434, or the config file's).
    #[arg(long)]
    port: Option<u16>,
    /// TOML settings (see docs/api.md); they override the hardware plan (`zoe-llm probe`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Model id or alias (default: the embedded default model).
    #[arg(short, long)]
    model: Option<String>,
    /// CPU worker threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Activation precision of the CPU engine: q8 (fast, llama.cpp's scheme) or f32 (exact).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Q8)]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Q8,
    F32,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Q8 => Precision::Q8,
            PrecisionArg::F32 => Precision::F32,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Use PROMPT as is (special tokens like <|im_start|> are parsed) instead of as a user message
    /// rendered through the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Sampling temperature; 0 is greedy (default: the model's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the K most likely tokens; 0 turns it off (default: the model's).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass (default: the model's).
    #[arg(long)]
    top_p: Option<f32>,
    /// Penalty for repeating recent tokens; 1 turns it off (default: the model's).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Random seed; the same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// The prompt.
    prompt: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Benchmark a synthetic AWQ checkpoint of these shapes (written once to a temporary
    /// directory, or to --out): prefill at --prompts, decode at --batches, roofline fraction.
    #[arg(long, value_enum, conflicts_with_all = ["model_dir", "server"])]
    synthetic: Option<zoe_llm::model::synth::SynthArch>,
    /// Benchmark the Hugging Face checkpoint (AWQ or fp16 safetensors) in DIR, like --synthetic.
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    model_dir: Option<PathBuf>,
    /// Where --synthetic writes its checkpoint (reused when it is already there).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Backend for --synthetic/--model-dir: cpu, cuda, or auto (CUDA when a device is there).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Prompt lengths to prefill (--synthetic/--model-dir).
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 512, 2048])]
    prompts: Vec<usize>,
    /// Decode batch sizes (--synthetic/--model-dir).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    batches: Vec<usize>,
    /// Decode steps timed per batch size (--synthetic/--model-dir).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Tokens already in each sequence's context before the timed decode steps.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Prompt tokens per prompt-processing run (0 skips it).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens per decode run (0 skips it).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Timed repetitions of each test.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// After the in-process runs, also decode --gen-tokens tokens of the same model through the
    /// Ollama /api/generate stream of the server at URL (e.g. http://127.0.0.1:11434), timed on the
    /// client, and print the ratio to the in-process tg rate.
    #[arg(long, value_name = "URL", value_parser = zoe_llm::bench::parse_server_url)]
    server: Option<reqwest::Url>,
    /// Measure image preprocessing (a 1080p JPEG) and the vision tower of Qwen2-VL-7B's shapes
    /// (synthetic fp16 weights; on the CPU, and on the GPU in a cuda build with a device) at these
    /// square image sides, instead of a language model.
    #[arg(long, value_delimiter = ',', value_name = "SIDES", num_args = 0.., default_missing_value = "224")]
    vision: Option<Vec<usize>>,
    /// Also measure constrained decoding's cost: the generation loop under a JSON Schema
    /// against the same loop free, same prompt, seed and token count.
    #[arg(long, conflicts_with = "server")]
    constrained: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to journald, with structured fields, when systemd connected our output to the journal
/// (`JOURNAL_STREAM`): every record carries `PRIORITY` (the level), `REQUEST_ID`, `MODEL`,
/// `METHOD`, `PATH` from the request span, and the event's own fields, upper-cased
/// (`journalctl -u zoe-llm REQUEST_ID=…`). Elsewhere (a terminal, Docker) they go to stderr.
fn init_logging(level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                // No `F_` prefix: our field names collide with none of journald's own.
                let journald = journald.with_syslog_identifier("zoe-llm".into()).with_field_prefix(None);
                tracing_subscriber::registry().with(filter).with(journald).init();
                return;
            }
            Err(e) => eprintln!("JOURNAL_STREAM is set but the journal socket cannot be used ({e}); logging to stderr"),
        }
    }
    // Colours only for a person at a terminal, not in files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// `zoe-llm ps`: `ollama ps`'s table from a running server, plus each engine's and upstream's state.
fn ps(server: Option<String>) -> Result<()> {
    let base = server
        .or_else(|| std::env::var("OLLAMA_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "http://127.0.0.1:11434".into());
    let base = if base.contains("://") { base } else { format!("http://{base}") };
    let base = base.trim_end_matches('/').to_owned();
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .no_proxy()
        .build()
        .context("HTTP client")?;
    let get = |path: &str| -> Result<serde_json::Value> {
        let r = client.get(format!("{base}{path}")).send().with_context(|| format!("cannot reach {base}"))?;
        // /health answers JSON with 503 too: its body is what we want.
        r.json().with_context(|| format!("{base}{path}: not JSON"))
    };
    let loaded = get("/api/ps")?;
    let health = get("/health")?;
    let models = loaded["models"].as_array().cloned().unwrap_or_default();
    let states: Vec<serde_json::Value> = health["models"].as_array().cloned().unwrap_or_default();
    println!("{:<28} {:>9} {:>8} {:<10} {:<20}", "NAME", "SIZE", "CONTEXT", "STATE", "UNTIL");
    for m in &models {
        let name = m["name"].as_str().unwrap_or("?");
        let size = m["size"].as_u64().unwrap_or(0) as f64 / 1e9;
        let state =
            states.iter().find(|s| s["name"].as_str() == Some(name)).and_then(|s| s["state"].as_str()).unwrap_or("-");
        let until = m["expires_at"].as_str().unwrap_or("");
        let until = if until.starts_with("9999") { "forever (pinned)" } else { until };
        println!(
            "{name:<28} {:>7.2} GB {:>8} {state:<10} {until:<20}",
            size,
            m["context_length"].as_u64().unwrap_or(0)
        );
    }
    for p in health["providers"].as_array().into_iter().flatten() {
        println!(
            "upstream {:<19} {:<8} breaker {:<6} {}",
            p["name"].as_str().unwrap_or("?"),
            p["kind"].as_str().unwrap_or("?"),
            p["breaker"].as_str().unwrap_or("?"),
            p["url"].as_str().unwrap_or("")
        );
    }
    println!("status: {}", health["status"].as_str().unwrap_or("unknown"));
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let store = Store::locate(cli.models_dir.as_deref())?;
    let registry = Registry::load(&store)?;
    match cli.command {
        Command::Run(args) => run_prompt(&store, &registry, args),
        Command::Pull { model, allow_unverified } => {
            let m = registry.resolve(&model)?;
            let opts = PullOptions { allow_unverified, ..PullOptions::from_env() };
            let path = pull(m, &store, &opts)?;
            eprintln!("{} is ready", m.id);
            // The path alone on stdout, so scripts can use it.
            println!("{}", path.display());
            Ok(())
        }
        Command::List => {
            list(&store, &registry);
            Ok(())
        }
        Command::Ps { server } => ps(server),
        Command::Bench(args) => bench(&store, &registry, args),
        Command::Serve(args) => serve(store, registry, args),
        Command::Probe { root, json, config } => probe(&registry, root.as_deref(), json, config.as_deref()),
        Command::CheckConfig { file, root } => check_config(&registry, &file, root.as_deref()),
        Command::Synth { arch, out, seed } => {
            let t = std::time::Instant::now();
            let s = zoe_llm::model::synth::write(arch, &out, seed)
                .with_context(|| format!("writing the synthetic checkpoint to {}", out.display()))?;
            eprintln!(
                "{}: {} tensors, {:.2} GiB in {} file(s), {:.1} s",
                arch.name(),
                s.tensors,
                s.bytes as f64 / (1u64 << 30) as f64,
                s.shards,
                t.elapsed().as_secs_f64()
            );
            println!("{}", out.display());
            Ok(())
        }
    }
}

fn list(store: &Store, registry: &Registry) {
    println!("{:<32} {:<8} {:<9} ALIASES", "MODEL", "FORMAT", "PRESENT");
    for m in registry.manifests() {
        let format = match m.format {
            Format::Gguf => "gguf",
            Format::AwqSafetensors => "awq",
        };
        let present = if store.is_present(m) { "yes" } else { "no" };
        println!("{:<32} {:<8} {:<9} {}", m.id, format, present, m.aliases.join(", "));
    }
    println!("\nmodels directory: {}", store.root().display());
}

/// The manifest a command names (the default model when none is named), checked to be one this
/// build can run before anything is downloaded.
fn resolve(registry: &Registry, args: &EngineArgs) -> Result<Manifest> {
    let manifest = match &args.model {
        Some(name) => registry.resolve(name)?.clone(),
        None => registry.default_model().context("no default model in the registry")?.clone(),
    };
    if manifest.format != Format::Gguf {
        // AWQ checkpoints load on the CPU's exact AWQ path (`bench --model-dir`), but serving them
        // waits for the CUDA engine to be wired into the model manager.
        bail!(
            "model '{}' is {:?}, which needs the CUDA engine; this build runs GGUF models on the CPU only",
            manifest.id,
            manifest.format
        );
    }
    Ok(manifest)
}

/// Thread count from the flag (default: physical cores), within 1..=logical CPUs.
fn threads(args: &EngineArgs) -> Result<usize> {
    let cpus = provider_probe::logical_cores();
    match args.threads {
        None => Ok(provider_probe::physical_cores()),
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) if n > cpus => bail!("--threads {n} is more than the {cpus} CPUs of this machine"),
        Some(n) => Ok(n),
    }
}

/// Pulls the model if missing and loads it.
fn load(
    store: &Store,
    manifest: &Manifest,
    args: &EngineArgs,
    threads: usize,
) -> Result<LoadedModel<zoe_llm::backend::cpu::CpuBackend>> {
    let path = ensure(manifest, store, &PullOptions::from_env())?;
    let precision = Precision::from(args.precision);
    let t = std::time::Instant::now();
    let loaded = LoadedModel::load(manifest, &path, threads, precision)?;
    tracing::info!(model = %manifest.id, threads, ?precision, ms = t.elapsed().as_millis() as u64, "model loaded");
    Ok(loaded)
}

fn run_prompt(store: &Store, registry: &Registry, args: RunArgs) -> Result<()> {
    // Everything the flags can get wrong is checked before a download or a load.
    let manifest = resolve(registry, &args.engine)?;
    let threads = threads(&args.engine)?;
    let d = manifest.defaults.sampling.params();
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(d.temperature),
        top_k: args.top_k.unwrap_or(d.top_k),
        top_p: args.top_p.unwrap_or(d.top_p),
        repeat_penalty: args.repeat_penalty.unwrap_or(d.repeat_penalty),
        seed: args.seed,
        ..d
    };
    sampling.validate()?;
    let m = load(store, &manifest, &args.engine, threads)?;
    let prompt_ids = if args.raw {
        raw_prompt_ids(&m.tokenizer, &args.prompt)?
    } else {
        let messages = [serde_json::json!({"role": "user", "content": args.prompt})];
        render_chat_prompt(&m.tokenizer, &messages)?
    };
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: args.max_tokens,
        sampling,
        stop: manifest.defaults.stop.clone(),
        logprobs: None,
        constraint: None,
        mm: None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let out = generate(&m.model, &m.backend, &m.tokenizer, req, m.context_length, |e| {
        let text = e.text;
        if write_err.is_none() && !text.is_empty() {
            if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    // The reader left (`| head`): its choice, not an error, and no reason to keep
                    // generating.
                    std::process::exit(0);
                }
                write_err = Some(e);
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let _ = writeln!(stdout);
    let t = &out.timings;
    tracing::info!(
        prompt_tokens = out.prompt_tokens,
        generated = out.tokens.len(),
        finish = ?out.finish_reason,
        prompt_tok_s = format!("{:.1}", t.prompt_tokens_per_s().unwrap_or(0.0)),
        decode_tok_s = format!("{:.1}", t.decode_tokens_per_s().unwrap_or(0.0)),
        "done"
    );
    if out.finish_reason == FinishReason::Length {
        tracing::info!("stopped at the token limit (--max-tokens {}, context {})", args.max_tokens, m.context_length);
    }
    Ok(())
}

/// The probe's report: the files of `root`, else this machine (refined by the CUDA driver itself
/// when this build has the `cuda` feature).
fn report(root: Option<&std::path::Path>) -> Result<provider_probe::Report> {
    if let Some(dir) = root {
        if !dir.is_dir() {
            bail!("--root {}: not a directory", dir.display());
        }
        return Ok(provider_probe::probe_root(dir));
    }
    #[allow(unused_mut)]
    let mut report = provider_probe::probe();
    #[cfg(feature = "cuda")]
    match zoe_llm::backend::cuda::device_count() {
        Ok(0) => {
            report.cuda.available = false;
            report.cuda.reason = Some("the CUDA driver reports no device".into());
        }
        Ok(_) => {
            report.cuda.available = true;
            report.cuda.reason = None;
        }
        Err(e) => {
            report.cuda.available = false;
            report.cuda.reason = Some(e.to_string());
        }
    }
    Ok(report)
}

fn probe(
    registry: &Registry,
    root: Option<&std::path::Path>,
    json: bool,
    config: Option<&std::path::Path>,
) -> Result<()> {
    use zoe_llm::server::ServeConfig;
    let config = match config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    let report = report(root)?;
    let plan = zoe_llm::plan::plan(&report, &config, registry);
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "report": report, "plan": plan }))?);
    } else {
        print!("{}{}", report.summary(), plan.summary());
    }
    Ok(())
}

/// `check-config FILE`: parse and validate (TOML errors name the line and field; the checks below
/// name the entry), then the plan the file gives here.
fn check_config(registry: &Registry, file: &std::path::Path, root: Option<&std::path::Path>) -> Result<()> {
    use zoe_llm::plan::Backend;
    let config = zoe_llm::server::ServeConfig::from_file(file)?;
    for (field, names) in [("preload", &config.preload), ("on_demand", &config.on_demand)] {
        for (i, name) in names.iter().enumerate() {
            registry.resolve(name).map_err(|e| anyhow::anyhow!("{}: {field}[{i}]: {e}", file.display()))?;
        }
    }
    let mut warnings = Vec::new();
    if !cfg!(feature = "cuda") {
        if config.backend == Some(Backend::Cuda) {
            warnings.push("backend = \"cuda\": this binary was built without the cuda feature; AWQ models would run on the CPU (exact, slow)".to_owned());
        }
        for name in &config.preload {
            if registry.get(name).is_some_and(|m| m.format == Format::AwqSafetensors) {
                warnings.push(format!(
                    "preload {name:?}: an AWQ model, which `serve` loads only in a build with the cuda feature"
                ));
            }
        }
    }
    let plan = zoe_llm::plan::plan(&report(root)?, &config, registry);
    for w in &warnings {
        eprintln!("warning: {}: {w}", file.display());
    }
    println!("{}: ok", file.display());
    print!("{}", plan.summary());
    Ok(())
}

/// A model `serve` may pin: any known model in a build with the CUDA engine, GGUF only without
/// (AWQ on the CPU is the exact reference path, far too slow to serve).
fn resolve_for_serve(registry: &Registry, name: &str, args: &EngineArgs) -> Result<Manifest> {
    if cfg!(feature = "cuda") {
        return Ok(registry.resolve(name)?.clone());
    }
    resolve(registry, &EngineArgs { model: Some(name.to_owned()), ..args.clone() })
}

fn serve(store: Store, registry: Registry, args: ServeArgs) -> Result<()> {
    use zoe_llm::plan::Backend;
    use zoe_llm::server::{engines::Engines, engines::StoreSource, AppState, ServeConfig};
    let mut config = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(host) = args.host {
        config.host = host;
    }
    if let Some(port) = args.port {
        config.port = port;
    }
    if let Some(t) = args.engine.threads {
        config.threads = Some(t);
    }
    // `-m` pins that model instead of the config's or the plan's.
    if let Some(m) = &args.engine.model {
        config.preload = vec![m.clone()];
    }
    let threads = threads(&EngineArgs { threads: config.threads, ..args.engine.clone() })?;
    // The hardware plan decides what the config leaves open; the config keeps the plan's answers
    // so the running server reports what it does.
    let plan = zoe_llm::plan::plan(&report(None)?, &config, &registry);
    for note in &plan.notes {
        tracing::info!("plan: {note}");
    }
    tracing::info!(
        backend = plan.backend.as_str(),
        pinned = ?plan.pinned,
        on_demand = ?plan.on_demand,
        budget = plan.memory_budget_bytes,
        kv_cache_bytes = plan.kv_cache_bytes,
        max_num_seqs = plan.max_num_seqs,
        "plan"
    );
    config.backend = Some(plan.backend);
    config.max_num_seqs = Some(plan.max_num_seqs);
    config.kv_cache_bytes = Some(plan.kv_cache_bytes);
    config.memory_budget_bytes = Some(plan.memory_budget_bytes);
    config.on_demand = plan.on_demand.clone();
    config.upstreams = plan.upstreams.clone();
    let engine = config.engine()?;
    // Said once at start: which engine AWQ models will get (GGUF models always run on the CPU).
    #[cfg(feature = "cuda")]
    match zoe_llm::backend::cuda::device_count() {
        Ok(n) => tracing::info!("CUDA: {n} device(s); AWQ models run on the CUDA engine"),
        Err(e) => tracing::warn!("{e}; every model runs on the CPU engine"),
    }
    // What to load at start: the plan's pinned models (none when proxying). Everything is
    // checked (and pulled if missing) before the port is opened.
    let pinned = if plan.backend == Backend::OllamaProxy { Vec::new() } else { plan.pinned.clone() };
    let mut preload = Vec::new();
    for name in &pinned {
        preload.push(resolve_for_serve(&registry, name, &args.engine)?);
    }
    config.preload = preload.iter().map(|m| m.id.clone()).collect();
    for m in &preload {
        ensure(m, &store, &PullOptions::from_env())?;
    }
    let precision = Precision::from(args.engine.precision);
    let loopback = match config.host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => config.host == "localhost",
    };
    let source = std::sync::Arc::new(StoreSource { store, threads, precision });
    let engines = Engines::new(source, engine, config.keep_alive, plan.memory_budget_bytes);
    // The Ollama-proxy plan runs no engines here: every model goes to an upstream.
    let local = plan.backend != Backend::OllamaProxy;
    let providers = zoe_llm::provider::Providers::new(local, &config.upstreams, &config.routes);
    let state =
        std::sync::Arc::new(AppState { registry, engines, config, loopback, providers, shutdown: Default::default() });
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        for m in &preload {
            // Pinned: never expires, whatever later requests say.
            state.engines.pin(&m.id);
            state.engines.get(m, &m.id, Some(None)).await.map_err(|e| {
                anyhow::anyhow!("loading {}: {}", m.id, e.message(zoe_llm::server::error::Dialect::Ollama))
            })?;
        }
        zoe_llm::server::serve(state).await
    })
}

/// `bench --synthetic` / `--model-dir`: the checkpoint benchmark on the chosen backend.
fn bench_checkpoint(args: &BenchArgs) -> Result<()> {
    let dir = match (&args.model_dir, args.synthetic) {
        (Some(dir), _) => dir.clone(),
        (None, Some(arch)) => {
            let dir =
                args.out.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("zoe-synth-{}", arch.name())));
            if !dir.join("config.json").is_file() {
                eprintln!("writing the synthetic {} checkpoint to {} …", arch.name(), dir.display());
                zoe_llm::model::synth::write(arch, &dir, 0)
                    .with_context(|| format!("writing the synthetic checkpoint to {}", dir.display()))?;
            }
            dir
        }
        (None, None) => unreachable!("called for --synthetic or --model-dir"),
    };
    if args.prompts.contains(&0) || args.batches.contains(&0) || args.steps == 0 || args.context == 0 {
        bail!("--prompts, --batches, --steps and --context must all be above 0");
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    #[cfg(feature = "cuda")]
    if args.backend != BackendArg::Cpu {
        match zoe_llm::backend::cuda::CudaBackend::new(0) {
            Ok(be) => {
                println!("device: {}", be.device());
                let m = LoadedModel::load_hf_dir(&name, &dir, be, None)?;
                return print_checkpoint(&m, args);
            }
            Err(e) if args.backend == BackendArg::Cuda => return Err(e.into()),
            Err(e) => tracing::warn!("{e}; benchmarking on the CPU"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if args.backend == BackendArg::Cuda {
        bail!("--backend cuda: this binary was built without the `cuda` feature");
    }
    let precision = Precision::from(args.engine.precision);
    let be = zoe_llm::backend::cpu::CpuBackend::with_precision(threads(&args.engine)?, precision);
    let m = LoadedModel::load_hf_dir(&name, &dir, be, None)?;
    print_checkpoint(&m, args)
}

fn print_checkpoint<B: zoe_llm::backend::Backend>(m: &LoadedModel<B>, args: &BenchArgs) -> Result<()>
where
    B::KvLayer: Send,
{
    let r = zoe_llm::bench::run_checkpoint(m, &args.prompts, &args.batches, args.context, args.steps, args.reps)?;
    let backend = zoe_llm::backend::Backend::name(&m.backend);
    println!(
        "model {} on {backend}: {:.3} GiB of weights read per decode step; copy bandwidth {:.1} GB/s (measured)",
        m.id,
        r.weight_bytes as f64 / (1u64 << 30) as f64,
        r.copy_bandwidth / 1e9
    );
    println!("| test | t/s | ms per forward | roofline |");
    println!("| --- | --- | --- | --- |");
    for s in &r.results {
        let roof = s.roofline.map_or("-".to_owned(), |f| format!("{:.0}%", f * 100.0));
        println!("| {} | {:.1} | {:.2} | {roof} |", s.test, s.tokens_per_s, s.ms);
    }
    println!("pp N: one prompt of N tokens (ms = time to first token); tg bB: B sequences of {} context tokens, one token each per step, median of {} steps x {} reps", args.context, args.steps, args.reps);
    Ok(())
}

fn bench(store: &Store, registry: &Registry, args: BenchArgs) -> Result<()> {
    use zoe_llm::bench::{http_vs_loop, HttpTarget, HTTP_PROMPT};
    if args.synthetic.is_some() || args.model_dir.is_some() {
        return bench_checkpoint(&args);
    }
    if let Some(sides) = &args.vision {
        if sides.iter().any(|&s| s < 28) {
            bail!("--vision: image sides must be at least 28 pixels");
        }
        println!("| test | ms per image | GFLOP | GFLOP/s |");
        println!("| --- | --- | --- | --- |");
        for r in zoe_llm::bench::vision(args.reps, sides, threads(&args.engine)?)? {
            let (g, rate) =
                r.gflop.map_or(("-".into(), "-".into()), |g| (format!("{g:.0}"), format!("{:.1}", g / r.ms * 1e3)));
            println!("| {} | {:.1} | {g} | {rate} |", r.test, r.ms);
        }
        return Ok(());
    }
    let manifest = resolve(registry, &args.engine)?;
    let threads = threads(&args.engine)?;
    let ctx = manifest.defaults.context_length as usize;
    for (flag, n) in [("--prompt-tokens", args.prompt_tokens), ("--gen-tokens", args.gen_tokens)] {
        if n > ctx {
            bail!("{flag} {n} is more than the model's context of {ctx} tokens");
        }
    }
    // The server is checked before the (long) in-process runs, not after them.
    let target = match &args.server {
        Some(_) if args.gen_tokens == 0 => bail!("--server compares decode rates: it needs --gen-tokens above 0"),
        Some(url) => {
            let target = HttpTarget::new(url.clone())?;
            let version = target.probe()?;
            tracing::info!(%url, version, "bench server answers");
            Some(target)
        }
        None => None,
    };
    let m = load(store, &manifest, &args.engine, threads)?;
    let mut results = zoe_llm::bench::run(&m, args.prompt_tokens, args.gen_tokens, args.reps)?;
    let backend = zoe_llm::backend::Backend::name(&m.backend).to_owned();
    let (n_threads, precision) = (m.backend.threads(), m.backend.precision());
    let (in_loop, http) = match &target {
        Some(t) => {
            let (l, h) = http_vs_loop(&m, t, &manifest.id, args.gen_tokens, args.reps)?;
            (Some(l), Some(h))
        }
        None => (None, None),
    };
    results.extend(in_loop.clone());
    println!("| model | backend | threads | precision | test | t/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &results {
        println!(
            "| {} | {} | {} | {:?} | {} | {:.2} ± {:.2} |",
            manifest.id, backend, n_threads, precision, r.test, r.tokens_per_s, r.stddev
        );
    }
    if args.constrained {
        let r = zoe_llm::bench::constrained_vs_free(&m, args.reps)?;
        let (free, json, len) = (&r.free, &r.constrained, r.mean_len);
        for r in [free, json] {
            println!(
                "| {} | {} | {} | {:?} | {} | {:.2} ± {:.2} |",
                manifest.id, backend, n_threads, precision, r.test, r.tokens_per_s, r.stddev
            );
        }
        println!(
            "constrained/free decode rate: {:.3}x ({len:.0} tokens per run, temperature 0.8, top_k 40, {} reps, alternating)",
            json.tokens_per_s / free.tokens_per_s,
            args.reps
        );
        println!(
            "schema compile: {:.1} ms the first time (builds the token trie), {:.1} ms after",
            r.first_compile_ms, r.compile_ms
        );
    }
    let Some(h) = http else { return Ok(()) };
    let c = &h.client;
    println!("| {} | http | - | - | {} | {:.2} ± {:.2} |", manifest.id, c.test, c.tokens_per_s, c.stddev);
    println!();
    let url = args.server.as_ref().map(|u| u.as_str()).unwrap_or_default();
    println!(
        "{}: {url}api/generate, raw prompt {HTTP_PROMPT:?}, temperature 0, num_predict {}; client t/s = (eval_count - 1) / (done line - first line)",
        c.test, args.gen_tokens
    );
    match &h.server {
        Some(s) => println!("server eval rate (eval_count/eval_duration): {:.2} ± {:.2} t/s", s.tokens_per_s, s.stddev),
        None => println!("server eval rate: not reported (no eval_duration in the done line)"),
    }
    for (i, r) in h.runs.iter().enumerate() {
        if r.eval_count < args.gen_tokens as u64 {
            println!(
                "note: run {} stopped early (done_reason {}) after {} of {} tokens; its rate is from the tokens that arrived",
                i + 1,
                r.done_reason.as_deref().unwrap_or("none"),
                r.eval_count,
                args.gen_tokens
            );
        }
    }
    let tg = format!("tg{}", args.gen_tokens);
    if let Some(local) = results.iter().find(|r| r.test == tg) {
        println!(
            "http/in-process decode (vs bare forwards, tg{}): {:.2}x",
            args.gen_tokens,
            c.tokens_per_s / local.tokens_per_s
        );
    }
    if let Some(l) = &in_loop {
        println!("http/in-process decode (vs the same generation loop): {:.2}x", c.tokens_per_s / l.tokens_per_s);
    }
    Ok(())
}
