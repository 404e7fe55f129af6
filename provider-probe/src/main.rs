//! `provider-probe [--root DIR] [--json]`: what this box is (board, CPU, memory, CUDA, TensorRT,
//! L4T). `--json` prints the report as JSON on stdout, otherwise a short summary; `--root` reads
//! the files below DIR instead of the live system (a fixture tree, a mounted image).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: provider-probe [--root DIR] [--json]";

fn main() -> ExitCode {
    let mut root: Option<PathBuf> = None;
    let mut json = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--json") => json = true,
            Some("--root") => match args.next() {
                Some(dir) => root = Some(dir.into()),
                None => return usage("--root needs a directory"),
            },
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => return usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let report = match &root {
        Some(dir) if !dir.is_dir() => return usage(&format!("--root {}: not a directory", dir.display())),
        Some(dir) => provider_probe::probe_root(dir),
        None => provider_probe::probe(),
    };
    if !json {
        print!("{}", report.summary());
        return ExitCode::SUCCESS;
    }
    match serde_json::to_string_pretty(&report) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("provider-probe: cannot encode the report as JSON: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("provider-probe: {problem}\n{USAGE}");
    ExitCode::from(2)
}
