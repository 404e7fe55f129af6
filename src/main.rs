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
use zoe_llm::hub::{ensure, pull, Manifest, PullOptions, Registry, Store};
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
    /// Measure prompt-processing and decode throughput (llama-bench style).
    Bench(BenchArgs),
}

#[derive(Args)]
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

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Q8,
    F32,
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
    /// Prompt tokens per prompt-processing run (0 skips it).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens per decode run (0 skips it).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Timed repetitions of each test.
    #[arg(long, default_value_t = 5)]
    reps: usize,
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

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only for a person at a terminal, not in files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
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
        Command::Bench(args) => bench(&store, &registry, args),
    }
}

fn list(store: &Store, registry: &Registry) {
    println!("{:<32} {:<8} {:<9} ALIASES", "MODEL", "FORMAT", "PRESENT");
    for m in registry.manifests() {
        let format = match m.format {
            zoe_llm::hub::Format::Gguf => "gguf",
            zoe_llm::hub::Format::AwqSafetensors => "awq",
        };
        let present = if store.is_present(m) { "yes" } else { "no" };
        println!("{:<32} {:<8} {:<9} {}", m.id, format, present, m.aliases.join(", "));
    }
    println!("\nmodels directory: {}", store.root().display());
}

/// Resolves the model (the default when none is named), pulls it if missing, and loads it.
fn load(
    store: &Store,
    registry: &Registry,
    args: &EngineArgs,
) -> Result<(Manifest, LoadedModel<zoe_llm::backend::cpu::CpuBackend>)> {
    let manifest = match &args.model {
        Some(name) => registry.resolve(name)?.clone(),
        None => registry.default_model().context("no default model in the registry")?.clone(),
    };
    let path = ensure(&manifest, store, &PullOptions::from_env())?;
    let threads = args.threads.unwrap_or_else(provider_probe::physical_cores);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let precision = match args.precision {
        PrecisionArg::Q8 => Precision::Q8,
        PrecisionArg::F32 => Precision::F32,
    };
    let t = std::time::Instant::now();
    let loaded = LoadedModel::load(&manifest, &path, threads, precision)?;
    tracing::info!(model = %manifest.id, threads, ?precision, ms = t.elapsed().as_millis() as u64, "model loaded");
    Ok((manifest, loaded))
}

fn run_prompt(store: &Store, registry: &Registry, args: RunArgs) -> Result<()> {
    let (manifest, m) = load(store, registry, &args.engine)?;
    let d = &manifest.defaults.sampling;
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(d.temperature),
        top_k: args.top_k.unwrap_or(d.top_k as usize),
        top_p: args.top_p.unwrap_or(d.top_p),
        min_p: d.min_p,
        repeat_penalty: args.repeat_penalty.unwrap_or(d.repeat_penalty),
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let prompt_ids = if args.raw {
        raw_prompt_ids(&m.tokenizer, &args.prompt)?
    } else {
        let messages = [serde_json::json!({"role": "user", "content": args.prompt})];
        render_chat_prompt(&m.tokenizer, &messages)?
    };
    let req =
        GenerateRequest { prompt_ids, max_tokens: args.max_tokens, sampling, stop: manifest.defaults.stop.clone() };
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let out = generate(&m.model, &m.backend, &m.tokenizer, req, m.context_length, |text| {
        if write_err.is_none() {
            if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        // A closed pipe (`| head`) is the reader's choice, not an error worth a message.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
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
        tracing::info!("stopped at --max-tokens {}", args.max_tokens);
    }
    Ok(())
}

fn bench(store: &Store, registry: &Registry, args: BenchArgs) -> Result<()> {
    let (manifest, m) = load(store, registry, &args.engine)?;
    let results = zoe_llm::bench::run(&m, args.prompt_tokens, args.gen_tokens, args.reps)?;
    println!("| model | backend | threads | precision | test | t/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in results {
        println!(
            "| {} | {} | {} | {:?} | {} | {:.2} ± {:.2} |",
            manifest.id,
            zoe_llm::backend::Backend::name(&m.backend),
            m.backend.threads(),
            m.backend.precision(),
            r.test,
            r.tokens_per_s,
            r.stddev
        );
    }
    Ok(())
}
