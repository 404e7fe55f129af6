//! Every fixture root (`tests/fixtures/<board>/`, strings from the real boards: see the README
//! there) probes as that board: family, model, module variant, memory, CUDA, TensorRT, L4T.

use std::path::{Path, PathBuf};

use provider_probe::{probe_root, Family, Report};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn probe(name: &str) -> Report {
    probe_root(&fixture(name))
}

const KIB: u64 = 1024;

/// What one board must probe as.
struct Expect {
    root: &'static str,
    family: Family,
    model: &'static str,
    variant: Option<&'static str>,
    super_mode: bool,
    soc: Option<&'static str>,
    mem_total_kib: u64,
    arch: &'static str,
    cores: (usize, usize),
    cuda: bool,
    gpu: Option<&'static str>,
    driver: Option<&'static str>,
    tensorrt: Option<&'static str>,
    l4t: Option<(&'static str, &'static str)>,
}

const BOARDS: &[Expect] = &[
    Expect {
        root: "agx-orin-64gb",
        family: Family::JetsonOrin,
        model: "NVIDIA Jetson AGX Orin Developer Kit",
        variant: Some("agx-orin-64gb"),
        super_mode: false,
        soc: Some("tegra234"),
        mem_total_kib: 64349184,
        arch: "aarch64",
        cores: (12, 12),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("10.3.0"),
        l4t: Some(("36.4.3", "6.2")),
    },
    Expect {
        root: "agx-orin-32gb",
        family: Family::JetsonOrin,
        model: "NVIDIA Jetson AGX Orin Developer Kit",
        variant: Some("agx-orin-32gb"),
        super_mode: false,
        soc: Some("tegra234"),
        mem_total_kib: 31433728,
        arch: "aarch64",
        cores: (8, 8),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("10.3.0"),
        l4t: Some(("36.4.4", "6.2.1")),
    },
    Expect {
        root: "orin-nx-16gb",
        family: Family::JetsonOrin,
        model: "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
        variant: Some("orin-nx-16gb"),
        super_mode: false,
        soc: Some("tegra234"),
        mem_total_kib: 16039540,
        arch: "aarch64",
        cores: (8, 8),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("10.3.0"),
        l4t: Some(("36.4.3", "6.2")),
    },
    Expect {
        // JetPack 5: driver libraries in .../tegra, a model string without "Jetson".
        root: "orin-nx-8gb",
        family: Family::JetsonOrin,
        model: "NVIDIA Orin NX Developer Kit",
        variant: Some("orin-nx-8gb"),
        super_mode: false,
        soc: Some("tegra234"),
        mem_total_kib: 7625888,
        arch: "aarch64",
        cores: (6, 6),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("8.5.2"),
        l4t: Some(("35.4.1", "5.1.2")),
    },
    Expect {
        root: "orin-nano-8gb-super",
        family: Family::JetsonOrin,
        model: "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        variant: Some("orin-nano-8gb"),
        super_mode: true,
        soc: Some("tegra234"),
        mem_total_kib: 7802664,
        arch: "aarch64",
        cores: (6, 6),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("10.3.0"),
        l4t: Some(("36.4.3", "6.2")),
    },
    Expect {
        root: "orin-nano-4gb",
        family: Family::JetsonOrin,
        model: "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit",
        variant: Some("orin-nano-4gb"),
        super_mode: false,
        soc: Some("tegra234"),
        mem_total_kib: 3555936,
        arch: "aarch64",
        cores: (6, 6),
        cuda: true,
        gpu: Some("Orin"),
        driver: None,
        tensorrt: Some("8.6.2"),
        l4t: Some(("36.3.0", "6.0")),
    },
    Expect {
        root: "raspberry-pi-5",
        family: Family::RaspberryPi,
        model: "Raspberry Pi 5 Model B Rev 1.0",
        variant: Some("pi5"),
        super_mode: false,
        soc: Some("bcm2712"),
        mem_total_kib: 8252368,
        arch: "aarch64",
        cores: (4, 4),
        cuda: false,
        gpu: None,
        driver: None,
        tensorrt: None,
        l4t: None,
    },
    Expect {
        root: "raspberry-pi-4",
        family: Family::RaspberryPi,
        model: "Raspberry Pi 4 Model B Rev 1.4",
        variant: Some("pi4"),
        super_mode: false,
        soc: Some("bcm2711"),
        mem_total_kib: 3884968,
        arch: "aarch64",
        cores: (4, 4),
        cuda: false,
        gpu: None,
        driver: None,
        tensorrt: None,
        l4t: None,
    },
    Expect {
        root: "x86-rtx4090",
        family: Family::Generic,
        model: "Micro-Star International Co., Ltd. MS-7E12",
        variant: None,
        super_mode: false,
        soc: None,
        mem_total_kib: 65842948,
        arch: "x86_64",
        cores: (16, 8),
        cuda: true,
        gpu: Some("NVIDIA GeForce RTX 4090"),
        driver: Some("550.54.14"),
        tensorrt: None,
        l4t: None,
    },
    Expect {
        root: "x86-cpu-only",
        family: Family::Generic,
        model: "QEMU Standard PC (Q35 + ICH9, 2009)",
        variant: None,
        super_mode: false,
        soc: None,
        mem_total_kib: 24684092,
        arch: "x86_64",
        cores: (2, 2),
        cuda: false,
        gpu: None,
        driver: None,
        tensorrt: None,
        l4t: None,
    },
    Expect {
        root: "rk3588-rock5b",
        family: Family::Generic,
        model: "Radxa ROCK 5B",
        variant: None,
        super_mode: false,
        soc: Some("rk3588"),
        mem_total_kib: 16110160,
        arch: "aarch64",
        cores: (8, 8),
        cuda: false,
        gpu: None,
        driver: None,
        tensorrt: None,
        l4t: None,
    },
];

#[test]
fn every_board_probes_as_itself() {
    for e in BOARDS {
        let r = probe(e.root);
        let at = e.root;
        assert_eq!(r.board.family, e.family, "{at}");
        assert_eq!(r.board.model.as_deref(), Some(e.model), "{at}");
        assert_eq!(r.board.variant.as_deref(), e.variant, "{at}");
        assert_eq!(r.board.super_mode, e.super_mode, "{at}");
        assert_eq!(r.board.soc.as_deref(), e.soc, "{at}");
        assert_eq!(r.memory.total_bytes, Some(e.mem_total_kib * KIB), "{at}");
        let avail = r.memory.available_bytes.unwrap_or_else(|| panic!("{at}: MemAvailable"));
        assert!(avail <= e.mem_total_kib * KIB, "{at}");
        // Jetson memory is the GPU's too; nowhere else.
        assert_eq!(r.memory.unified, e.family == Family::JetsonOrin, "{at}");
        assert_eq!(r.cpu.arch, e.arch, "{at}");
        assert_eq!((r.cpu.logical_cores, r.cpu.physical_cores), (Some(e.cores.0), Some(e.cores.1)), "{at}");
        assert!(r.cpu.model.is_some(), "{at}");
        assert_eq!(r.cuda.available, e.cuda, "{at}: {:?}", r.cuda);
        assert_eq!(r.cuda.reason.is_none(), e.cuda, "{at}: a reason exactly when unavailable");
        assert_eq!(r.cuda.devices.first().map(|d| d.name.as_str()), e.gpu, "{at}");
        assert_eq!(
            r.cuda.devices.first().is_some_and(|d| d.integrated),
            e.family == Family::JetsonOrin && e.cuda,
            "{at}"
        );
        assert_eq!(r.cuda.driver_version.as_deref(), e.driver, "{at}");
        assert_eq!(r.tensorrt.available, e.tensorrt.is_some(), "{at}");
        assert_eq!(r.tensorrt.version.as_deref(), e.tensorrt, "{at}");
        let l4t = r.l4t.as_ref().map(|l| (l.release.as_str(), l.jetpack.as_deref().unwrap_or("?")));
        assert_eq!(l4t, e.l4t, "{at}");
        assert!(r.notes.is_empty(), "{at}: {:?}", r.notes);
    }
}

#[test]
fn jetson_modules_carry_their_part_number() {
    for (root, part) in [
        ("agx-orin-64gb", "p3701-0005"),
        ("agx-orin-32gb", "p3701-0004"),
        ("orin-nx-16gb", "p3767-0000"),
        ("orin-nx-8gb", "p3767-0001"),
        ("orin-nano-8gb-super", "p3767-0005"),
        ("orin-nano-4gb", "p3767-0004"),
    ] {
        let r = probe(root);
        assert_eq!(r.board.module.as_deref(), Some(part), "{root}");
        assert!(r.board.compatible.iter().any(|c| c == "nvidia,tegra234"), "{root}");
        let soc0 = r.board.soc0.as_ref().unwrap();
        assert_eq!((soc0.family.as_deref(), soc0.soc_id.as_deref()), (Some("Tegra"), Some("35")), "{root}");
        // The driver library: JetPack 6 keeps it in .../nvidia, JetPack 5 in .../tegra.
        let dir = if root == "orin-nx-8gb" { "tegra" } else { "nvidia" };
        assert!(r.cuda.libraries.contains(&format!("/usr/lib/aarch64-linux-gnu/{dir}/libcuda.so.1")), "{root}");
    }
}

#[test]
fn the_cuda_stub_is_not_a_driver() {
    let r = probe("x86-cpu-only");
    assert!(!r.cuda.available);
    assert!(r.cuda.libraries.is_empty(), "{:?}", r.cuda.libraries);
    assert!(!probe("x86-rtx4090").cuda.libraries.iter().any(|l| l.contains("stubs")));
}

#[test]
fn garbage_and_empty_roots_are_generic_and_unknown() {
    for root in ["garbage", "empty", "does-not-exist"] {
        let r = probe(root);
        assert_eq!(r.board.family, Family::Generic, "{root}");
        assert_eq!(r.board.model, None, "{root}");
        assert_eq!(r.board.variant, None, "{root}");
        assert_eq!(r.memory.total_bytes, None, "{root}");
        assert_eq!(r.memory.available_bytes, None, "{root}");
        assert_eq!(r.cpu.arch, "unknown", "{root}");
        assert_eq!(r.cpu.logical_cores, None, "{root}");
        assert!(!r.cuda.available && r.cuda.reason.is_some(), "{root}");
        assert!(!r.tensorrt.available, "{root}");
        assert_eq!(r.l4t, None, "{root}");
    }
    // Garbage is noticed, not silently dropped.
    let notes = probe("garbage").notes.join("\n");
    for what in ["MemTotal", "nv_tegra_release", "device-tree/model", "cpuinfo"] {
        assert!(notes.contains(what), "{what} missing from {notes}");
    }
    assert!(probe("empty").notes.is_empty());
}

/// Deterministic junk (xorshift): no test dependency, the same bytes on every run.
fn junk(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}

#[test]
fn random_bytes_in_every_file_never_panic() {
    let files = [
        "proc/device-tree/model",
        "proc/device-tree/compatible",
        "proc/cpuinfo",
        "proc/meminfo",
        "etc/nv_tegra_release",
        "sys/devices/soc0/family",
        "sys/devices/soc0/soc_id",
        "sys/devices/soc0/machine",
        "sys/devices/system/cpu/online",
        "sys/devices/system/cpu/cpu0/topology/core_cpus_list",
        "sys/class/dmi/id/product_name",
        "proc/driver/nvidia/version",
        "proc/driver/nvidia/gpus/0000:01:00.0/information",
    ];
    let mut seed = 0x9e3779b97f4a7c15u64;
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let len = (junk(&mut seed, 1)[0] as usize) * (round % 5 + 1) * 8;
            let mut bytes = junk(&mut seed, len);
            // Half the rounds: junk that starts like the real thing.
            if round % 2 == 0 {
                bytes.splice(0..0, b"MemTotal: 123 kB\n# R36 (release), REVISION: ".iter().copied());
            }
            std::fs::write(&path, bytes).unwrap();
        }
        let r = probe_root(dir.path());
        assert_ne!(r.board.family, Family::RaspberryPi);
        serde_json::to_string(&r).unwrap();
        let _ = r.summary();
    }
}

#[test]
fn an_orin_whose_container_lacks_the_driver_says_why() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("orin-nx-16gb"), dir.path());
    std::fs::remove_file(dir.path().join("dev/nvhost-ctrl-gpu")).unwrap();
    let r = probe_root(dir.path());
    assert_eq!(r.board.family, Family::JetsonOrin);
    assert!(!r.cuda.available);
    assert!(r.cuda.reason.as_deref().unwrap().contains("NVIDIA runtime"), "{:?}", r.cuda.reason);
    std::fs::remove_dir_all(dir.path().join("usr/lib/aarch64-linux-gnu/nvidia")).unwrap();
    std::fs::write(dir.path().join("dev/nvhost-ctrl-gpu"), "").unwrap();
    let r = probe_root(dir.path());
    assert!(r.cuda.reason.as_deref().unwrap().contains("libcuda.so.1 is not installed"), "{:?}", r.cuda.reason);
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_binary_prints_the_report_as_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_provider-probe"))
        .arg("--root")
        .arg(fixture("orin-nano-8gb-super"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["board"]["family"], "jetson-orin");
    assert_eq!(json["board"]["model"], "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super");
    assert_eq!(json["board"]["variant"], "orin-nano-8gb");
    assert_eq!(json["memory"]["total_bytes"], 7802664 * KIB);
    assert_eq!(json["cuda"]["available"], true);
    assert_eq!(json["l4t"]["jetpack"], "6.2");
    // The same report the library makes.
    let report: Report = serde_json::from_value(json).unwrap();
    assert_eq!(report, probe("orin-nano-8gb-super"));

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_provider-probe"))
        .args(["--root", "/nonexistent/dir", "--json"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a directory"));
}
