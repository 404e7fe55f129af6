use zoe_llm::backend::cpu::Precision;
use zoe_llm::model::loaded::LoadedModel;
#[test]
fn scratch() {
    let p = std::env::var("ZOE_TEST_GGUF").unwrap();
    let (pp, tg): (usize, usize) = match std::env::var("WHICH").as_deref() { Ok("pp") => (128, 0), Ok("tg") => (0, 64), _ => (128, 64) };
    let threads: usize = std::env::var("T").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let prec = if std::env::var("F32").is_ok() { Precision::F32 } else { Precision::Q8 };
    let m = LoadedModel::load_gguf("x", std::path::Path::new(&p), threads, prec, None).unwrap();
    let reps = std::env::var("REPS").ok().and_then(|t| t.parse().ok()).unwrap_or(3);
    for r in zoe_llm::bench::run(&m, pp, tg, reps).unwrap() { eprintln!("{prec:?} {} {:.1} ± {:.1}", r.test, r.tokens_per_s, r.stddev); }
}
