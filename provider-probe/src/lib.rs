//! What is this box? Board, CPU, memory, CUDA, TensorRT and L4T, read once at start-up to pick a
//! serving plan (the plan itself is zoe-llm's `plan` module).
//!
//! [`probe_root`] reads only files below a root directory, so every board can be tested from a
//! fixture tree (`tests/fixtures/<board>/`); [`probe`] is `probe_root("/")` plus what only the live
//! process can know (its affinity mask, the running architecture). Neither ever fails or panics:
//! what cannot be read, or reads as garbage, is unknown, and `notes` says why.
//!
//! Upstream Ollama/OpenAI reachability is the provider router's business, not the probe's.

mod board;
mod cpu;
mod nvidia;
mod root;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use board::{nominal_gb, Board, Family, Soc0};
pub use cpu::{logical_cores, parse_cpuinfo, physical_cores, Cpu};
pub use nvidia::{Cuda, GpuDevice, L4t, TensorRt};

use root::Root;

/// Everything the probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub board: Board,
    pub cpu: Cpu,
    pub memory: Memory,
    pub cuda: Cuda,
    pub tensorrt: TensorRt,
    /// Jetson Linux (L4T) from `/etc/nv_tegra_release`, with the JetPack that ships it.
    pub l4t: Option<L4t>,
    /// Files that were there but made no sense, and disagreements between sources.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// MemTotal: on Jetson the unified memory the GPU shares. `None` if unreadable.
    pub total_bytes: Option<u64>,
    /// MemAvailable (MemFree on kernels before 3.14).
    pub available_bytes: Option<u64>,
    /// CPU and GPU share this memory (Jetson): model weights and KV cache come out of it.
    pub unified: bool,
}

/// Below 16 MiB or above 64 TiB, MemTotal is a corrupt file, not a machine.
const MEM_SANE: std::ops::RangeInclusive<u64> = (16 << 20)..=(64 << 40);

/// Probes the system whose files are below `root`, reading nothing outside it.
pub fn probe_root(root: &Path) -> Report {
    let root = Root::new(root);
    let mut notes = Vec::new();
    let memory_text = root.text("proc/meminfo", 64 << 10);
    let (total, available) = match &memory_text {
        Some(text) => parse_meminfo(text, &mut notes),
        None => (None, None),
    };
    let (l4t, lib_dir) = match root.text("etc/nv_tegra_release", 4096) {
        Some(text) => match nvidia::parse_l4t(&text) {
            Some((l4t, dir)) => (Some(l4t), dir),
            None => {
                notes.push("etc/nv_tegra_release does not say an L4T release".into());
                (None, None)
            }
        },
        None => (None, None),
    };
    let board = board::probe(&root, total, l4t.as_ref().and_then(nvidia::l4t_major), &mut notes);
    let jetson = board.family == Family::JetsonOrin || board.soc.as_deref().is_some_and(|s| s.starts_with("tegra"));
    let cpu = cpu::probe(&root, &mut notes);
    let cuda = nvidia::probe_cuda(&root, jetson, lib_dir.as_deref());
    let tensorrt = nvidia::probe_tensorrt(&root, lib_dir.as_deref());
    Report {
        board,
        cpu,
        memory: Memory { total_bytes: total, available_bytes: available, unified: jetson },
        cuda,
        tensorrt,
        l4t,
        notes,
    }
}

/// Probes this machine: [`probe_root`] of `/`, with the core counts this process may use and the
/// architecture it runs as.
pub fn probe() -> Report {
    let mut report = probe_root(Path::new("/"));
    report.cpu.arch = sysinfo::System::cpu_arch();
    report.cpu.logical_cores = Some(logical_cores());
    report.cpu.physical_cores = Some(physical_cores());
    if report.cpu.model.is_none() {
        report.cpu.model = sysinfo::System::new_with_specifics(
            sysinfo::RefreshKind::nothing().with_cpu(sysinfo::CpuRefreshKind::nothing()),
        )
        .ok()
        .and_then(|s| s.cpus().first().map(|c| c.brand().trim().to_owned()))
        .filter(|brand| !brand.is_empty());
    }
    report
}

/// MemTotal and MemAvailable in bytes from /proc/meminfo text; absurd values are unknown.
pub fn parse_meminfo(text: &str, notes: &mut Vec<String>) -> (Option<u64>, Option<u64>) {
    let field = |key: &str| -> Option<Option<u64>> {
        let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
        let mut words = line.split_once(':')?.1.split_whitespace();
        let value: Option<u64> = words.next().and_then(|n| n.parse().ok());
        let bytes = match words.next() {
            Some("kB") => value.and_then(|v| v.checked_mul(1024)),
            None => value,
            Some(_) => None,
        };
        Some(bytes)
    };
    let total = match field("MemTotal") {
        Some(Some(t)) if MEM_SANE.contains(&t) => Some(t),
        Some(_) => {
            notes.push("proc/meminfo: MemTotal is not a plausible size; memory unknown".into());
            None
        }
        None => {
            notes.push("proc/meminfo has no MemTotal; memory unknown".into());
            None
        }
    };
    let available = field("MemAvailable").or_else(|| field("MemFree")).flatten();
    let available = match (total, available) {
        (Some(t), Some(a)) if a <= t => Some(a),
        (None, _) | (_, None) => None,
        (Some(_), Some(_)) => {
            notes.push("proc/meminfo: MemAvailable is above MemTotal; ignored".into());
            None
        }
    };
    (total, available)
}

impl Report {
    /// A few lines for a person: board, memory, CUDA, TensorRT, L4T, notes.
    pub fn summary(&self) -> String {
        let gib =
            |b: Option<u64>| b.map_or("unknown".to_owned(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
        let b = &self.board;
        let mut out = format!(
            "board:    {} — {}{}{}\n",
            b.family.as_str(),
            b.model.as_deref().unwrap_or("unknown model"),
            b.variant.as_deref().map(|v| format!(" ({v})")).unwrap_or_default(),
            if b.super_mode { ", Super" } else { "" }
        );
        let cores = |n: Option<usize>| n.map_or("?".to_owned(), |n| n.to_string());
        out += &format!(
            "cpu:      {} {}, {} logical / {} physical cores\n",
            self.cpu.arch,
            self.cpu.model.as_deref().unwrap_or("(model unknown)"),
            cores(self.cpu.logical_cores),
            cores(self.cpu.physical_cores)
        );
        out += &format!(
            "memory:   {} total, {} available{}\n",
            gib(self.memory.total_bytes),
            gib(self.memory.available_bytes),
            if self.memory.unified { " (unified with the GPU)" } else { "" }
        );
        let c = &self.cuda;
        out += &if c.available {
            let names: Vec<&str> = c.devices.iter().map(|d| d.name.as_str()).collect();
            format!(
                "cuda:     yes, {} (driver {})\n",
                names.join(", "),
                c.driver_version.as_deref().unwrap_or("version unknown")
            )
        } else {
            format!("cuda:     no — {}\n", c.reason.as_deref().unwrap_or("unknown"))
        };
        out += &match (&self.tensorrt.available, &self.tensorrt.version) {
            (true, Some(v)) => format!("tensorrt: {v}\n"),
            (true, None) => "tensorrt: yes\n".to_owned(),
            (false, _) => "tensorrt: no\n".to_owned(),
        };
        if let Some(l4t) = &self.l4t {
            out += &format!("l4t:      R{} (JetPack {})\n", l4t.release, l4t.jetpack.as_deref().unwrap_or("unknown"));
        }
        for n in &self.notes {
            out += &format!("note:     {n}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let mut notes = Vec::new();
        let t = "MemTotal:        7802664 kB\nMemFree:          512000 kB\nMemAvailable:    5336064 kB\n";
        assert_eq!(parse_meminfo(t, &mut notes), (Some(7802664 * 1024), Some(5336064 * 1024)));
        assert!(notes.is_empty());
        // Old kernels: no MemAvailable.
        assert_eq!(
            parse_meminfo("MemTotal: 1048576 kB\nMemFree: 1024 kB\n", &mut notes),
            (Some(1 << 30), Some(1 << 20))
        );
        // Absurd, overflowing, truncated or missing values are unknown, with a note.
        for bad in [
            "MemTotal: 99999999999999999999 kB\n",
            "MemTotal: 18446744073709551615 kB\n",
            "MemTotal: 12 kB\n",
            "MemTotal: 7802664 MB\n",
            "MemTot",
            "",
        ] {
            let mut notes = Vec::new();
            assert_eq!(parse_meminfo(bad, &mut notes).0, None, "{bad:?}");
            assert_eq!(notes.len(), 1, "{bad:?}");
        }
        let mut notes = Vec::new();
        assert_eq!(
            parse_meminfo("MemTotal: 1048576 kB\nMemAvailable: 2097152 kB\n", &mut notes),
            (Some(1 << 30), None)
        );
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn this_machine_probes_consistently() {
        let p = probe();
        let (logical, physical) = (p.cpu.logical_cores.unwrap(), p.cpu.physical_cores.unwrap());
        assert!(physical >= 1 && physical <= logical, "{p:?}");
        assert_eq!(logical, logical_cores());
        assert!(!p.cpu.arch.is_empty());
        if let (Some(total), Some(avail)) = (p.memory.total_bytes, p.memory.available_bytes) {
            assert!(avail <= total, "{p:?}");
        }
        // The report survives a JSON round trip (the CLI prints it; tests read it back).
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), p);
        assert!(!p.summary().is_empty());
    }
}
