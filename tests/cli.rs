//! The `zoe-llm` binary end to end on the real SmolLM2 model, and the errors a user can run into.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use zoe_llm::backend::cpu::Precision;
use zoe_llm::model::loaded::{LoadError, LoadedModel};

const BIN: &str = env!("CARGO_BIN_EXE_zoe-llm");
/// Nothing listens on the discard port of loopback: a stand-in for "offline".
const DEAD_INDEX: &str = "http://127.0.0.1:9/simple";

/// A models directory holding SmolLM2 (a symlink to the test model: `pull` verifies a file found
/// in place instead of downloading it).
fn models_dir(gguf: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("smollm2-135m");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::os::unix::fs::symlink(gguf, model_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    dir
}

fn zoe(models: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("--models-dir").arg(models).args(args).env("ZOE_PYPI_INDEX", DEAD_INDEX).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model() -> Option<PathBuf> {
    common::smollm2_gguf(std::thread::current().name().unwrap_or("cli"))
}

#[test]
fn run_raw_greedy_prints_exactly_the_reference_continuation() {
    let Some(gguf) = model() else { return };
    let dir = models_dir(&gguf);
    let goldens: Value = serde_json::from_str(include_str!("fixtures/smollm2_goldens.json")).unwrap();
    let case = &goldens["exact"][0];
    let want_ids: Vec<u32> =
        case["greedy"].as_array().unwrap()[..12].iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let m = LoadedModel::load_gguf("smollm2", &gguf, 1, Precision::F32, None).unwrap();
    let want = m.tokenizer.decode(&want_ids, true);

    let prompt = case["prompt"].as_str().unwrap();
    let args = [
        "run",
        "--raw",
        "--precision",
        "f32",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1",
        "--max-tokens",
        "12",
        prompt,
    ];
    let o = zoe(dir.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{want}\n"), "stdout holds the generated text only");
}

#[test]
fn run_chat_uses_the_template_and_a_seed_repeats() {
    let Some(gguf) = model() else { return };
    let dir = models_dir(&gguf);
    let args = ["--log", "info", "run", "--temperature", "0.9", "--seed", "42", "--max-tokens", "24", "Name a fruit."];
    let a = zoe(dir.path(), &args);
    let b = zoe(dir.path(), &args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!stdout(&a).trim().is_empty());
    assert_eq!(stdout(&a), stdout(&b), "same seed, same output");
    // The chat template's end-of-turn token ends generation (greedy: a 38-token answer, well
    // before the 64-token limit; a sampled answer's length depends on the arithmetic's last
    // bits) and never shows as text.
    let g = zoe(dir.path(), &["--log", "info", "run", "--temperature", "0", "--max-tokens", "64", "Name a fruit."]);
    assert!(g.status.success(), "{}", stderr(&g));
    assert!(stderr(&g).contains("finish=Stop"), "{}", stderr(&g));
    for o in [&a, &g] {
        assert!(!stdout(o).contains("<|im_end|>") && !stdout(o).contains("<|im_start|>"));
    }

    let l = zoe(dir.path(), &["list"]);
    assert!(l.status.success());
    let line = stdout(&l).lines().find(|l| l.starts_with("smollm2-135m")).unwrap().to_owned();
    assert!(line.contains("yes") && line.contains("smollm2:135m"), "{line}");
}

/// `bench --constrained` prints the free and the JSON-Schema decode rates and their ratio.
#[test]
fn bench_constrained_prints_both_rates() {
    let Some(gguf) = model() else { return };
    let dir = models_dir(&gguf);
    let o = zoe(dir.path(), &["bench", "--constrained", "--prompt-tokens", "0", "--gen-tokens", "0", "--reps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for line in ["| tg (free) |", "| tg (JSON schema) |", "constrained/free decode rate: "] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    let o = zoe(dir.path(), &["bench", "--constrained", "--server", "http://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(2), "--constrained and --server conflict: {}", stderr(&o));
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code() {
    let Some(gguf) = model() else { return };
    let dir = models_dir(&gguf);

    let o = zoe(dir.path(), &["run", "-m", "no-such-model", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no-such-model") && stderr(&o).contains("smollm2-135m"), "{}", stderr(&o));

    // 9000 digits are 9000 tokens (SmolLM2 splits digits): longer than the 8192-token context.
    let long = "7".repeat(9000);
    let o = zoe(dir.path(), &["run", "--raw", &long]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("9000") && stderr(&o).contains("8192"), "{}", stderr(&o));

    let o = zoe(dir.path(), &["run", "--threads", "0", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("threads"), "{}", stderr(&o));

    let o = zoe(dir.path(), &["run", "--threads", "100000", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--threads 100000"), "{}", stderr(&o));

    let o = zoe(dir.path(), &["run", "--temperature=-1", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));

    let o = zoe(dir.path(), &["bench", "--prompt-tokens", "100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--prompt-tokens 100000") && stderr(&o).contains("8192"), "{}", stderr(&o));
}

/// Models this build cannot run, and flags that are wrong, fail before anything is downloaded:
/// the models directory is empty and no server is reachable, so any download attempt would
/// report "offline" instead.
#[test]
fn checks_come_before_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let o = zoe(dir.path(), &["run", "-m", "qwen2.5-coder:7b", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("CUDA") && !stderr(&o).contains("offline"), "{}", stderr(&o));

    let o = zoe(dir.path(), &["run", "--top-p", "0", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("top_p") && !stderr(&o).contains("offline"), "{}", stderr(&o));
}

#[test]
fn missing_model_while_offline_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = zoe(dir.path(), &["run", "hello"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("offline") && e.contains("127.0.0.1:9"), "{e}");
    assert!(o.stdout.is_empty());
}

#[test]
fn corrupt_or_foreign_model_files_are_load_errors() {
    let Some(gguf) = model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&gguf).unwrap();

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e =
        LoadedModel::load_gguf("t", &truncated, 1, Precision::Q8, None).err().expect("a truncated file must not load");
    assert!(matches!(e, LoadError::Gguf { .. }) && e.to_string().contains("truncated"), "{e}");

    // Same file, architecture renamed in place ("llama" → "llamb", same length).
    let mut foreign = bytes.clone();
    let key = b"general.architecture";
    let at = foreign.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&foreign[at..at + 5], b"llama");
    foreign[at + 4] = b'b';
    let path = dir.path().join("foreign.gguf");
    std::fs::write(&path, &foreign).unwrap();
    let e = LoadedModel::load_gguf("f", &path, 1, Precision::Q8, None)
        .err()
        .expect("an unknown architecture must not load");
    assert!(e.to_string().contains("unknown architecture 'llamb'"), "{e}");
}

/// `synth` writes a checkpoint `bench --model-dir` loads and measures: every prefill size and
/// batch gets a line, decode lines carry a roofline fraction, and bad flags or a directory
/// without a checkpoint are clear errors.
#[test]
fn synth_then_bench_a_synthetic_checkpoint() {
    let models = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tiny");
    let dir_s = dir.to_str().unwrap();
    let o = zoe(models.path(), &["synth", "--arch", "tiny", "--out", dir_s, "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), dir_s);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let args = ["bench", "--model-dir", dir_s, "--backend", "cpu", "--prompts", "16,32", "--batches", "1,3"];
    let o = zoe(models.path(), &[&args[..], &["--steps", "2", "--reps", "1", "--context", "8"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("GiB of weights read per decode step") && text.contains("GB/s (measured)"), "{text}");
    for test in ["pp16", "pp32", "tg b1", "tg b3"] {
        let line =
            text.lines().find(|l| l.starts_with(&format!("| {test} |"))).unwrap_or_else(|| panic!("{test}: {text}"));
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(cols[2].parse::<f64>().unwrap() > 0.0, "{line}");
        assert_eq!(cols[4].ends_with('%'), test.starts_with("tg"), "{line}");
    }
    let o = zoe(models.path(), &["bench", "--model-dir", out.path().to_str().unwrap(), "--backend", "cpu"]);
    assert!(!o.status.success() && stderr(&o).contains("config.json"), "{}", stderr(&o));
    let o = zoe(models.path(), &["bench", "--model-dir", dir_s, "--batches", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("must all be above 0"), "{}", stderr(&o));
}

fn fixture_root(board: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("provider-probe/tests/fixtures").join(board)
}

#[test]
fn probe_prints_the_report_and_plan_of_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture_root("orin-nx-16gb");
    let o = zoe(dir.path(), &["probe", "--root", root.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["report"]["board"]["family"], "jetson-orin");
    assert_eq!(json["report"]["board"]["model"], "NVIDIA Jetson Orin NX Engineering Reference Developer Kit");
    assert_eq!(json["report"]["board"]["variant"], "orin-nx-16gb");
    assert_eq!(json["report"]["memory"]["total_bytes"], 16039540u64 * 1024);
    assert_eq!(json["report"]["cuda"]["available"], true);
    assert_eq!(json["plan"]["backend"], "cuda");
    assert_eq!(json["plan"]["pinned"], serde_json::json!(["llama-3.2-3b-instruct-awq"]));

    // A config overrides the plan; without --json a summary for people.
    let cfg = dir.path().join("serve.toml");
    std::fs::write(&cfg, "backend = \"cpu\"\n").unwrap();
    let o = zoe(dir.path(), &["probe", "--root", root.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("orin-nx-16gb") && out.contains("plan:     cpu") && out.contains("smollm2-135m"), "{out}");

    let pi = fixture_root("raspberry-pi-5");
    let o = zoe(dir.path(), &["probe", "--root", pi.to_str().unwrap(), "--json"]);
    let json: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["plan"]["backend"], "ollama-proxy");
    assert_eq!(json["plan"]["upstreams"][0]["url"], "http://127.0.0.1:11435");

    let o = zoe(dir.path(), &["probe", "--root", "/nonexistent/root"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture_root("x86-cpu-only");
    let check = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let o = zoe(dir.path(), &["check-config", path.to_str().unwrap(), "--root", root.to_str().unwrap()]);
        (o, path.display().to_string())
    };
    let (o, path) = check("good.toml", "port = 11500\npreload = [\"smollm2\"]\nmax_num_seqs = 4\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with(&format!("{path}: ok\n")), "{out}");
    assert!(out.contains("plan:     cpu") && out.contains("4 sequences") && out.contains("smollm2-135m"), "{out}");

    for (name, text, needles) in [
        ("typo.toml", "max_num_seq = 4\n", &["max_num_seq", "unknown field"][..]),
        ("model.toml", "preload = [\"smollm2\", \"no-such-model\"]\n", &["preload[1]", "no-such-model"]),
        ("demand.toml", "on_demand = [\"nope\"]\n", &["on_demand[0]", "nope"]),
        ("backend.toml", "backend = \"tpu\"\n", &["backend", "tpu", "ollama-proxy"]),
        ("zero.toml", "max_num_seqs = 0\n", &["max_num_seqs must be at least 1"]),
        ("url.toml", "[[upstreams]]\nname = \"pi\"\nkind = \"ollama\"\nurl = \"not a url\"\n", &["upstreams[0].url"]),
    ] {
        let (o, path) = check(name, text);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stdout(&o));
        let e = stderr(&o);
        assert!(e.contains(&path), "{name}: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {n:?} not in {e}");
        }
    }

    // Asking for CUDA in a build without it is a warning, not an error.
    let (o, _) = check("cuda.toml", "backend = \"cuda\"\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).contains("warning") && stderr(&o).contains("cuda feature"),
        !cfg!(feature = "cuda"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("plan:     cuda"), "{}", stdout(&o));
}

#[test]
fn ps_without_a_server_says_which_it_could_not_reach() {
    let dir = tempfile::tempdir().unwrap();
    let o = zoe(dir.path(), &["ps", "--server", "127.0.0.1:9"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot reach http://127.0.0.1:9"), "{}", stderr(&o));
}
