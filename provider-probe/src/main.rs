//! `provider-probe`: prints what this box is (board, CPU, memory) as JSON on stdout.

fn main() {
    let probe = provider_probe::probe();
    match serde_json::to_string_pretty(&probe) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("provider-probe: cannot encode the probe as JSON: {e}");
            std::process::exit(1);
        }
    }
}
