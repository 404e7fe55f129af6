//! The hardware plan for every fixture board (provider-probe/tests/fixtures), and the config
//! overriding each of its decisions.

use std::path::Path;

use provider_probe::{probe_root, Report};
use zoe_llm::hub::Registry;
use zoe_llm::plan::{plan, Backend, Plan, DEFAULT_KV_CACHE_BYTES, DEFAULT_OLLAMA_URL, KV_MAX, KV_MIN};
use zoe_llm::provider::UpstreamKind;
use zoe_llm::server::ServeConfig;

const CHAT: &str = "llama-3.2-3b-instruct-awq";
const CODER: &str = "qwen2.5-coder-7b-instruct-awq";
const VL: &str = "qwen2-vl-7b-instruct-awq";
const SMOL: &str = "smollm2-135m";

fn report(board: &str) -> Report {
    probe_root(&Path::new(env!("CARGO_MANIFEST_DIR")).join("provider-probe/tests/fixtures").join(board))
}

fn registry() -> Registry {
    Registry::embedded().unwrap()
}

fn config(toml_text: &str) -> ServeConfig {
    toml::from_str(toml_text).unwrap()
}

fn plan_for(board: &str, cfg: &ServeConfig) -> Plan {
    plan(&report(board), cfg, &registry())
}

fn resident(id: &str) -> u64 {
    registry().get(id).unwrap().resident_estimate().unwrap()
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Pinned models, the largest on-demand one beside them, and a KV cache for each: within budget.
fn assert_fits(p: &Plan, at: &str) {
    let pinned: u64 = p.pinned.iter().map(|id| resident(id)).sum();
    let largest = p.on_demand.iter().map(|id| resident(id)).max().unwrap_or(0);
    let models = p.pinned.len() as u64 + u64::from(largest > 0);
    let need = pinned + largest + models * p.kv_cache_bytes as u64;
    assert!(need <= p.memory_budget_bytes, "{at}: needs {need} > budget {}: {p:#?}", p.memory_budget_bytes);
    assert!((KV_MIN..=KV_MAX).contains(&(p.kv_cache_bytes as u64)), "{at}: {p:#?}");
}

#[test]
fn jetson_orin_boards_get_the_cuda_engine_and_as_many_awq_models_as_fit() {
    let cases: [(&str, &[&str], &[&str]); 5] = [
        ("agx-orin-64gb", &[CHAT, CODER, VL], &[]),
        ("agx-orin-32gb", &[CHAT, CODER, VL], &[]),
        ("orin-nx-16gb", &[CHAT], &[CODER, VL]),
        // 8 GB: a 7B model does not fit beside the pinned 3B, so none is offered.
        ("orin-nx-8gb", &[CHAT], &[]),
        ("orin-nano-8gb-super", &[CHAT], &[]),
    ];
    let cfg = ServeConfig::default();
    for (board, pinned, on_demand) in cases {
        let r = report(board);
        let p = plan(&r, &cfg, &registry());
        assert_eq!(p.backend, Backend::Cuda, "{board}: {p:#?}");
        assert_eq!(p.pinned, ids(pinned), "{board}");
        assert_eq!(p.on_demand, ids(on_demand), "{board}");
        // Unified memory: the budget is MemTotal less the reserve, never all of it.
        let total = r.memory.total_bytes.unwrap();
        assert_eq!(p.memory_budget_bytes, total - zoe_llm::plan::jetson_reserve(total), "{board}");
        assert!(total - p.memory_budget_bytes >= 3 << 29, "{board}: at least 1.5 GiB stays with the OS");
        assert_fits(&p, board);
        assert!(p.upstreams.is_empty(), "{board}");
        assert_eq!(p.max_num_seqs, 8, "{board}");
        if on_demand.is_empty() && pinned.len() == 1 {
            let why = p.notes.join("\n");
            assert!(why.contains(CODER) && why.contains(VL) && why.contains("does not fit"), "{board}: {why}");
        }
    }
}

#[test]
fn an_orin_nano_4gb_serves_the_default_model_and_says_why() {
    let p = plan_for("orin-nano-4gb", &ServeConfig::default());
    assert_eq!(p.backend, Backend::Cpu);
    assert_eq!(p.pinned, ids(&[SMOL]));
    assert!(p.on_demand.is_empty());
    let why = p.notes.join("\n");
    assert!(why.contains(CHAT) && why.contains("more than the"), "{why}");
}

#[test]
fn raspberry_pis_proxy_the_local_ollama() {
    for board in ["raspberry-pi-5", "raspberry-pi-4"] {
        let p = plan_for(board, &ServeConfig::default());
        assert_eq!(p.backend, Backend::OllamaProxy, "{board}");
        assert!(p.pinned.is_empty() && p.on_demand.is_empty(), "{board}");
        assert_eq!(p.upstreams.len(), 1, "{board}");
        let u = &p.upstreams[0];
        assert_eq!((u.name.as_str(), u.kind, u.url.as_str()), ("ollama", UpstreamKind::Ollama, DEFAULT_OLLAMA_URL));
        assert_eq!(DEFAULT_OLLAMA_URL, "http://127.0.0.1:11435");
    }
}

#[test]
fn a_pc_with_an_nvidia_gpu_runs_cuda_without_guessing_its_memory() {
    let r = report("x86-rtx4090");
    let p = plan(&r, &ServeConfig::default(), &registry());
    assert_eq!(p.backend, Backend::Cuda);
    assert_eq!(p.pinned, ids(&[CHAT]));
    assert_eq!(p.on_demand, ids(&[CODER, VL]));
    assert_eq!(p.kv_cache_bytes, DEFAULT_KV_CACHE_BYTES);
    assert_eq!(p.memory_budget_bytes, r.memory.total_bytes.unwrap() / 5 * 4);
    // Told the GPU's budget, it pins everything that fits there.
    let p = plan(&r, &config("memory_budget_bytes = 23_000_000_000\n"), &registry());
    assert_eq!(p.pinned, ids(&[CHAT, CODER, VL]));
    assert_fits(&p, "rtx4090 with a budget");
}

#[test]
fn cpu_boxes_and_unreadable_roots_serve_the_default_model() {
    for board in ["x86-cpu-only", "rk3588-rock5b", "garbage", "empty"] {
        let r = report(board);
        let p = plan(&r, &ServeConfig::default(), &registry());
        assert_eq!(p.backend, Backend::Cpu, "{board}");
        assert_eq!(p.pinned, ids(&[SMOL]), "{board}");
        assert!(p.on_demand.is_empty() && p.upstreams.is_empty(), "{board}");
        assert_eq!((p.max_num_seqs, p.kv_cache_bytes), (8, DEFAULT_KV_CACHE_BYTES), "{board}");
        // 80% of the memory, as before the plan existed; 8 GiB assumed when unknown.
        let total = r.memory.total_bytes.unwrap_or(8 << 30);
        assert_eq!(p.memory_budget_bytes, total / 5 * 4, "{board}");
        assert_eq!(
            r.memory.total_bytes.is_none(),
            p.notes.iter().any(|n| n.contains("memory size unknown")),
            "{board}"
        );
    }
}

#[test]
fn pre_orin_jetsons_and_orins_without_cuda_run_on_the_cpu() {
    let mut r = report("orin-nx-16gb");
    r.cuda.available = false;
    r.cuda.reason = Some("no device node".into());
    let p = plan(&r, &ServeConfig::default(), &registry());
    assert_eq!((p.backend, p.pinned.clone()), (Backend::Cpu, ids(&[SMOL])));
    assert!(p.notes[0].contains("no device node"), "{:?}", p.notes);
    // A Xavier (sm_72) has CUDA, but not what the kernels need.
    let mut r = report("orin-nx-16gb");
    r.board.family = provider_probe::Family::Generic;
    r.board.soc = Some("tegra194".into());
    let p = plan(&r, &ServeConfig::default(), &registry());
    assert_eq!(p.backend, Backend::Cpu);
    assert!(p.notes[0].contains("tegra194"), "{:?}", p.notes);
}

#[test]
fn the_config_overrides_every_decision() {
    // Backend.
    let p = plan_for("agx-orin-64gb", &config("backend = \"cpu\"\n"));
    assert_eq!((p.backend, p.pinned.clone()), (Backend::Cpu, ids(&[SMOL])));
    let p = plan_for("x86-cpu-only", &config("backend = \"cuda\"\n"));
    assert_eq!(p.backend, Backend::Cuda);
    assert!(p.notes.iter().any(|n| n.starts_with("warning: CUDA is not available")), "{:?}", p.notes);
    // Pinned (names resolve to ids) and on demand; the plan's others stay on demand.
    let p = plan_for("orin-nx-16gb", &config("preload = [\"qwen2.5-coder:7b\"]\n"));
    assert_eq!(p.pinned, ids(&[CODER]));
    assert_eq!(p.on_demand, ids(&[CHAT, VL]));
    let p = plan_for("orin-nx-16gb", &config("preload = [\"llama3.2\"]\non_demand = [\"qwen2-vl\"]\n"));
    assert_eq!((p.pinned.clone(), p.on_demand.clone()), (ids(&[CHAT]), ids(&[VL])));
    // Budget, sequences, KV cache.
    let p = plan_for("orin-nx-16gb", &config("memory_budget_bytes = 40_000_000_000\n"));
    assert_eq!(p.memory_budget_bytes, 40_000_000_000);
    assert_eq!(p.pinned, ids(&[CHAT, CODER, VL]));
    let p = plan_for("agx-orin-64gb", &config("max_num_seqs = 4\nkv_cache_bytes = 1073741824\n"));
    assert_eq!((p.max_num_seqs, p.kv_cache_bytes), (4, 1 << 30));
    assert_eq!(p.pinned.len(), 3);
    // A KV cache too big for all three changes what is pinned.
    let p = plan_for("agx-orin-32gb", &config("kv_cache_bytes = 4294967296\n"));
    assert_eq!((p.pinned.clone(), p.on_demand.clone()), (ids(&[CHAT]), ids(&[CODER, VL])));
    assert_fits(&p, "agx-orin-32gb with 4 GiB of KV each");
    // A Pi with its own Ollama named: no default added; an OpenAI upstream alone gets one.
    let own = "[[upstreams]]\nname = \"pi\"\nkind = \"ollama\"\nurl = \"http://10.0.0.2:11434\"\n";
    let p = plan_for("raspberry-pi-5", &config(own));
    assert_eq!(p.upstreams.len(), 1);
    assert_eq!(p.upstreams[0].url, "http://10.0.0.2:11434");
    let openai = "[[upstreams]]\nname = \"ollama\"\nkind = \"openai\"\nurl = \"http://10.0.0.3:8000\"\n";
    let p = plan_for("raspberry-pi-5", &config(openai));
    let names: Vec<&str> = p.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["ollama", "ollama-default"]);
    // Config upstreams travel with every plan.
    assert_eq!(plan_for("agx-orin-64gb", &config(own)).upstreams.len(), 1);
}

#[test]
fn the_plan_is_pure_and_its_json_is_the_documented_shape() {
    let r = report("orin-nx-16gb");
    let cfg = ServeConfig::default();
    let a = plan(&r, &cfg, &registry());
    // A report read back from its JSON (what `provider-probe --json` prints) plans the same.
    let again: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(plan(&again, &cfg, &registry()), a);
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["backend"], "cuda");
    assert_eq!(json["pinned"][0], CHAT);
    for key in ["memory_budget_bytes", "on_demand", "max_num_seqs", "kv_cache_bytes", "upstreams", "notes"] {
        assert!(json.get(key).is_some(), "{key} missing: {json}");
    }
    assert_eq!(serde_json::to_value(plan_for("raspberry-pi-4", &cfg)).unwrap()["backend"], "ollama-proxy");
    assert_eq!(serde_json::to_value(plan_for("empty", &cfg)).unwrap()["backend"], "cpu");
}
