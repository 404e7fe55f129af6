//! Which board is this: Jetson Orin (and which module), Raspberry Pi, or anything else.
//!
//! Sources, most specific first: the device tree (`/proc/device-tree/model` and the
//! NUL-separated `compatible` list, which L4T and Raspberry Pi OS both provide and containers see
//! too), `/sys/devices/soc0/*` (the kernel's SoC device: on Tegra `family` = `Tegra`, `soc_id` =
//! the chip id, 35 = 0x23 for Tegra234), DMI (`/sys/class/dmi/id`) on PCs, which have no device
//! tree, and `/proc/cpuinfo`'s `Model` line, which the Raspberry Pi kernel adds.
//!
//! Jetson Orin modules are told apart by the part number in `compatible`
//! (`nvidia,p3768-0000+p3767-0005` = the P3767-0005 module on the P3768 carrier; JetPack 6.2's
//! Super device trees append `-super`):
//!
//! | part | module |
//! |---|---|
//! | p3701-0000 | AGX Orin developer-kit module (32 or 64 GB: told by memory) |
//! | p3701-0004 | AGX Orin 32GB |
//! | p3701-0005 | AGX Orin 64GB |
//! | p3701-0008 | AGX Orin Industrial 64GB |
//! | p3767-0000 | Orin NX 16GB |
//! | p3767-0001 | Orin NX 8GB |
//! | p3767-0003 | Orin Nano 8GB |
//! | p3767-0004 | Orin Nano 4GB |
//! | p3767-0005 | Orin Nano 8GB (developer-kit module) |
//!
//! The part number is cross-checked with MemTotal; where they disagree the report says so and the
//! plan uses the memory the kernel reports.

use serde::{Deserialize, Serialize};

use crate::root::{printable, Root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Jetson AGX Orin, Orin NX or Orin Nano (Tegra234): runs the CUDA engine.
    JetsonOrin,
    /// Raspberry Pi: proxies an upstream Ollama.
    RaspberryPi,
    /// Anything else: PCs (with or without an NVIDIA GPU), other ARM boards, older Jetsons.
    Generic,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::JetsonOrin => "jetson-orin",
            Family::RaspberryPi => "raspberry-pi",
            Family::Generic => "generic",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Board {
    pub family: Family,
    /// The board's own name: the device-tree model, else DMI vendor + product, else soc0's
    /// machine. `None` when nothing says.
    pub model: Option<String>,
    /// The device-tree `compatible` list, most specific first.
    pub compatible: Vec<String>,
    /// The SoC: the last `compatible` entry without its vendor (`tegra234`, `bcm2712`,
    /// `rk3588`), or `tegra234` from soc0's chip id.
    pub soc: Option<String>,
    /// `/sys/devices/soc0/*` when the kernel registers a SoC device.
    pub soc0: Option<Soc0>,
    /// Jetson module part number (`p3767-0005`).
    pub module: Option<String>,
    /// `agx-orin-64gb`, `agx-orin-32gb`, `orin-nx-16gb`, `orin-nx-8gb`, `orin-nano-8gb`,
    /// `orin-nano-4gb` (size left off when neither part number nor memory tells), `pi5`, `pi4`…
    pub variant: Option<String>,
    /// A Jetson Orin Nano/NX with JetPack 6.2's Super device tree (MAXN SUPER power mode).
    pub super_mode: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Soc0 {
    pub family: Option<String>,
    pub soc_id: Option<String>,
    pub machine: Option<String>,
    pub revision: Option<String>,
}

/// Tegra234's chip id as soc0 writes it (decimal), and as the Arm SMCCC SoC-id driver writes it.
const TEGRA234_IDS: [&str; 2] = ["35", "jep106:036b:0023"];

/// Reads the board from the files below `root`. `mem_total` (bytes) settles module sizes;
/// `l4t_major` is the L4T release installed, if any (R36 = JetPack 6 runs only on Orin).
pub(crate) fn probe(root: &Root, mem_total: Option<u64>, l4t_major: Option<u32>, notes: &mut Vec<String>) -> Board {
    let raw_model = root.text("proc/device-tree/model", 4096);
    let dt_model = raw_model.as_deref().and_then(printable);
    if raw_model.is_some() && dt_model.is_none() {
        notes.push("proc/device-tree/model is not readable text; board model unknown".into());
    }
    let compatible = root.read("proc/device-tree/compatible", 4096).map(|b| parse_compatible(&b)).unwrap_or_default();
    let soc0 = read_soc0(root);
    let dmi = dmi_name(root);
    let cpuinfo_model = root
        .text("proc/cpuinfo", 1 << 20)
        .and_then(|t| t.lines().find_map(|l| cpuinfo_field(l, "Model").and_then(printable)));
    let model = dt_model.clone().or(dmi).or_else(|| soc0.as_ref().and_then(|s| s.machine.clone())).or(cpuinfo_model);
    detect(model, compatible, soc0, mem_total, l4t_major, notes)
}

/// The board from what was read; pure, so every rule is testable without files.
pub(crate) fn detect(
    model: Option<String>,
    compatible: Vec<String>,
    soc0: Option<Soc0>,
    mem_total: Option<u64>,
    l4t_major: Option<u32>,
    notes: &mut Vec<String>,
) -> Board {
    let lower = model.as_deref().unwrap_or_default().to_lowercase();
    let soc0_tegra234 = soc0.as_ref().is_some_and(|s| {
        s.family.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("tegra"))
            && s.soc_id.as_deref().is_some_and(|id| TEGRA234_IDS.contains(&id))
    });
    let mut soc = compatible.last().and_then(|c| c.split_once(',')).map(|(_, chip)| chip.to_owned());
    if soc.is_none() && soc0_tegra234 {
        soc = Some("tegra234".into());
    }
    // Tegra234 is the Orin SoC; the compatible list names it even when a vendor carrier board
    // renames the model string.
    let tegra234 = compatible.iter().any(|c| c == "nvidia,tegra234") || soc0_tegra234;
    let named_orin = lower.contains("jetson") && lower.contains("orin");
    // JetPack 6 (L4T R36) supports only Orin modules: a container that sees no device tree but
    // has the L4T userspace is still on an Orin.
    let r36_only = model.is_none() && compatible.is_empty() && l4t_major == Some(36);
    let mut board =
        Board { family: Family::Generic, model, compatible, soc, soc0, module: None, variant: None, super_mode: false };
    if tegra234 || named_orin || r36_only {
        board.family = Family::JetsonOrin;
        if r36_only {
            notes.push("no device tree; L4T R36 (JetPack 6) runs only on Jetson Orin".into());
            board.soc = Some("tegra234".into());
        }
        orin_variant(&mut board, &lower, mem_total, notes);
    } else if lower.starts_with("raspberry pi") || board.compatible.iter().any(|c| c.starts_with("raspberrypi,")) {
        board.family = Family::RaspberryPi;
        board.variant = pi_variant(&lower, board.soc.as_deref());
    }
    board
}

/// `compatible` is a list of NUL-terminated strings; garbage entries are dropped.
fn parse_compatible(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split('\0')
        .filter_map(printable)
        .filter(|c| c.chars().all(|ch| ch.is_ascii_graphic()))
        .take(32)
        .collect()
}

fn read_soc0(root: &Root) -> Option<Soc0> {
    let s = Soc0 {
        family: root.value("sys/devices/soc0/family"),
        soc_id: root.value("sys/devices/soc0/soc_id"),
        machine: root.value("sys/devices/soc0/machine"),
        revision: root.value("sys/devices/soc0/revision"),
    };
    (s != Soc0::default()).then_some(s)
}

/// DMI `sys_vendor` + `product_name` (PCs and servers).
fn dmi_name(root: &Root) -> Option<String> {
    let field = |name: &str| {
        root.value(&format!("sys/class/dmi/id/{name}"))
            .or_else(|| root.value(&format!("sys/devices/virtual/dmi/id/{name}")))
    };
    match (field("sys_vendor"), field("product_name")) {
        (Some(v), Some(p)) if p.starts_with(&v) => Some(p),
        (Some(v), Some(p)) => Some(format!("{v} {p}")),
        (None, p) => p,
        (v, None) => v,
    }
}

/// `key : value` from a /proc/cpuinfo line.
pub(crate) fn cpuinfo_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (k, v) = line.split_once(':')?;
    (k.trim() == key).then(|| v.trim())
}

/// The Jetson module part number (`p3701-0005`, `p3767-0003`) in a compatible entry, and whether
/// the entry is a Super device tree.
fn module_part(entry: &str) -> Option<(String, bool)> {
    for family in ["p3701-", "p3767-"] {
        if let Some(at) = entry.find(family) {
            let rest = &entry[at + family.len()..];
            let sku: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if sku.len() == 4 {
                let part = format!("{family}{sku}");
                return Some((part, rest[4..].starts_with("-super")));
            }
        }
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OrinKind {
    Agx,
    Nx,
    Nano,
}

impl OrinKind {
    fn name(self) -> &'static str {
        match self {
            OrinKind::Agx => "agx-orin",
            OrinKind::Nx => "orin-nx",
            OrinKind::Nano => "orin-nano",
        }
    }
}

/// Module kind and nominal memory (GB) from the part number; `None` size = told by memory.
fn part_info(part: &str) -> Option<(OrinKind, Option<u32>)> {
    Some(match part {
        "p3701-0000" => (OrinKind::Agx, None),
        "p3701-0004" => (OrinKind::Agx, Some(32)),
        "p3701-0005" | "p3701-0008" => (OrinKind::Agx, Some(64)),
        "p3767-0000" => (OrinKind::Nx, Some(16)),
        "p3767-0001" => (OrinKind::Nx, Some(8)),
        "p3767-0003" | "p3767-0005" => (OrinKind::Nano, Some(8)),
        "p3767-0004" => (OrinKind::Nano, Some(4)),
        p if p.starts_with("p3701-") => (OrinKind::Agx, None),
        // p3767 SKUs not in the table: NX or Nano, which memory cannot tell.
        _ => return None,
    })
}

/// The nominal size (GB) a module with `total` bytes visible is sold as: carve-outs and the
/// kernel take 5–15% (an 8 GB Orin Nano shows about 7.4 GiB, a 64 GB AGX about 61 GiB), so the
/// nearest power of two after adding 8% back.
pub fn nominal_gb(total: u64) -> Option<u32> {
    let gib = total as f64 / (1u64 << 30) as f64;
    if !(0.25..=4096.0).contains(&gib) {
        return None;
    }
    Some(2f64.powi((gib * 1.08).log2().round() as i32) as u32)
}

fn orin_variant(board: &mut Board, lower_model: &str, mem_total: Option<u64>, notes: &mut Vec<String>) {
    let mem_gb = mem_total.and_then(nominal_gb);
    let part = board.compatible.iter().find_map(|c| module_part(c));
    board.super_mode = part.as_ref().is_some_and(|(_, s)| *s)
        || board.model.as_deref().is_some_and(|m| m.split_whitespace().any(|w| w == "Super"));
    let mut kind = None;
    let mut size = None;
    if let Some((p, _)) = &part {
        board.module = Some(p.clone());
        if let Some((k, s)) = part_info(p) {
            kind = Some(k);
            size = s;
        }
    }
    if kind.is_none() {
        kind = if lower_model.contains("agx") {
            Some(OrinKind::Agx)
        } else if lower_model.contains("orin nx") {
            Some(OrinKind::Nx)
        } else if lower_model.contains("orin nano") {
            Some(OrinKind::Nano)
        } else {
            None
        };
    }
    match (size, mem_gb) {
        (Some(nominal), Some(seen)) if nominal != seen => notes.push(format!(
            "module {} is sold with {nominal} GB but MemTotal says a {seen} GB class; the plan uses MemTotal",
            board.module.as_deref().unwrap_or("?")
        )),
        (None, Some(seen)) => size = Some(seen),
        _ => {}
    }
    let Some(kind) = kind else {
        notes.push("a Jetson Orin, but neither the compatible part number nor the model says which module".into());
        return;
    };
    // Only sizes that module is made in: an AGX is 32 or 64 GB, an NX 8 or 16, a Nano 4 or 8.
    let valid = match kind {
        OrinKind::Agx => [32, 64],
        OrinKind::Nx => [8, 16],
        OrinKind::Nano => [4, 8],
    };
    board.variant = Some(match size.filter(|s| valid.contains(s)) {
        Some(gb) => format!("{}-{gb}gb", kind.name()),
        None => kind.name().to_owned(),
    });
}

fn pi_variant(lower_model: &str, soc: Option<&str>) -> Option<String> {
    let by_model = [
        ("raspberry pi 500", "pi5"),
        ("raspberry pi 5", "pi5"),
        ("compute module 5", "pi5"),
        ("raspberry pi 400", "pi4"),
        ("raspberry pi 4", "pi4"),
        ("compute module 4", "pi4"),
        ("raspberry pi 3", "pi3"),
        ("compute module 3", "pi3"),
        ("raspberry pi zero 2", "zero2"),
    ];
    let found = by_model.iter().find(|(prefix, _)| lower_model.contains(prefix)).map(|(_, v)| *v);
    found
        .or(match soc {
            Some("bcm2712") => Some("pi5"),
            Some("bcm2711") => Some("pi4"),
            Some("bcm2837") => Some("pi3"),
            _ => None,
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(model: &str, compatible: &[&str], mem_gib: Option<f64>) -> (Board, Vec<String>) {
        let mut notes = Vec::new();
        let b = detect(
            printable(model),
            compatible.iter().map(|s| s.to_string()).collect(),
            None,
            mem_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
            None,
            &mut notes,
        );
        (b, notes)
    }

    #[test]
    fn jetson_orin_boards() {
        for name in [
            "NVIDIA Jetson AGX Orin Developer Kit",
            "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
            "NVIDIA Jetson Orin Nano Developer Kit",
            "Jetson AGX Orin",
        ] {
            let (b, _) = board(name, &[], None);
            assert_eq!((b.family, b.model.as_deref()), (Family::JetsonOrin, Some(name)), "{name}");
        }
        // The device tree's trailing NUL is not part of the name.
        let (b, _) = board("NVIDIA Jetson AGX Orin Developer Kit\0", &[], None);
        assert_eq!(b.model.as_deref(), Some("NVIDIA Jetson AGX Orin Developer Kit"));
        // A carrier board with its own name is still Orin by its SoC, and the module by its part.
        let (b, _) = board("Acme Edge Box", &["vendor,carrier", "nvidia,p3767-0000", "nvidia,tegra234"], Some(15.3));
        assert_eq!(b.family, Family::JetsonOrin);
        assert_eq!(b.model.as_deref(), Some("Acme Edge Box"));
        assert_eq!(b.variant.as_deref(), Some("orin-nx-16gb"));
        assert_eq!(b.soc.as_deref(), Some("tegra234"));
    }

    #[test]
    fn orin_variants_from_part_numbers_and_memory() {
        let cases = [
            (
                &["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"][..],
                61.3,
                "agx-orin-64gb",
                false,
            ),
            (&["nvidia,p3737-0000+p3701-0004", "nvidia,p3701-0004", "nvidia,tegra234"], 29.9, "agx-orin-32gb", false),
            // The developer-kit module comes in both sizes: memory decides.
            (&["nvidia,p3737-0000+p3701-0000", "nvidia,p3701-0000", "nvidia,tegra234"], 29.9, "agx-orin-32gb", false),
            (&["nvidia,p3737-0000+p3701-0000", "nvidia,p3701-0000", "nvidia,tegra234"], 61.3, "agx-orin-64gb", false),
            (&["nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"], 15.3, "orin-nx-16gb", false),
            (&["nvidia,p3768-0000+p3767-0001", "nvidia,p3767-0001", "nvidia,tegra234"], 7.4, "orin-nx-8gb", false),
            (
                &["nvidia,p3768-0000+p3767-0005-super", "nvidia,p3767-0005", "nvidia,tegra234"],
                7.4,
                "orin-nano-8gb",
                true,
            ),
            (&["nvidia,p3768-0000+p3767-0004", "nvidia,p3767-0004", "nvidia,tegra234"], 3.4, "orin-nano-4gb", false),
        ];
        for (compat, gib, variant, sup) in cases {
            let (b, notes) = board("NVIDIA Jetson", compat, Some(gib));
            assert_eq!(b.variant.as_deref(), Some(variant), "{compat:?}");
            assert_eq!(b.super_mode, sup, "{compat:?}");
            assert!(notes.is_empty(), "{notes:?}");
        }
        // Part number and memory disagree: the part number names the module, the note says so.
        let (b, notes) = board("x", &["nvidia,p3767-0000", "nvidia,tegra234"], Some(7.4));
        assert_eq!(b.variant.as_deref(), Some("orin-nx-16gb"));
        assert!(notes[0].contains("16 GB") && notes[0].contains("8 GB"), "{notes:?}");
        // No part number: the model string and memory.
        let (b, _) =
            board("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", &["nvidia,tegra234"], Some(7.4));
        assert_eq!((b.variant.as_deref(), b.super_mode), (Some("orin-nano-8gb"), true));
        // A size the module is not made in is left off rather than guessed.
        let (b, _) = board("Jetson AGX Orin", &[], Some(7.4));
        assert_eq!(b.variant.as_deref(), Some("agx-orin"));
    }

    #[test]
    fn raspberry_pi_boards() {
        for (name, variant) in [
            ("Raspberry Pi 5 Model B Rev 1.0", "pi5"),
            ("Raspberry Pi 4 Model B Rev 1.4", "pi4"),
            ("Raspberry Pi Compute Module 4 Rev 1.0", "pi4"),
            ("Raspberry Pi 500 Rev 1.0", "pi5"),
        ] {
            let (b, _) = board(name, &[], None);
            assert_eq!(
                (b.family, b.model.as_deref(), b.variant.as_deref()),
                (Family::RaspberryPi, Some(name), Some(variant))
            );
        }
        let (b, _) = board("", &["raspberrypi,5-model-b", "brcm,bcm2712"], None);
        assert_eq!((b.family, b.variant.as_deref()), (Family::RaspberryPi, Some("pi5")));
    }

    #[test]
    fn other_boards() {
        // Older Jetsons cannot run the Orin plan (sm_87 kernels).
        let (b, _) =
            board("NVIDIA Jetson Xavier NX Developer Kit", &["nvidia,p3509-0000+p3668-0001", "nvidia,tegra194"], None);
        assert_eq!((b.family, b.soc.as_deref()), (Family::Generic, Some("tegra194")));
        let (b, _) = board("Radxa ROCK 5B", &["radxa,rock-5b", "rockchip,rk3588"], None);
        assert_eq!((b.family, b.soc.as_deref(), b.variant), (Family::Generic, Some("rk3588"), None));
        let (b, _) = board("", &[], None);
        assert_eq!((b.family, b.model), (Family::Generic, None));
    }

    #[test]
    fn soc0_alone_says_tegra234() {
        let mut notes = Vec::new();
        let soc0 = Soc0 { family: Some("Tegra".into()), soc_id: Some("35".into()), ..Soc0::default() };
        let b = detect(None, Vec::new(), Some(soc0), None, None, &mut notes);
        assert_eq!((b.family, b.soc.as_deref()), (Family::JetsonOrin, Some("tegra234")));
    }

    #[test]
    fn nominal_sizes() {
        let gib = |g: f64| (g * (1u64 << 30) as f64) as u64;
        for (seen, nominal) in [(3.4, 4), (7.27, 8), (7.44, 8), (15.3, 16), (29.9, 32), (61.3, 64), (3.7, 4)] {
            assert_eq!(nominal_gb(gib(seen)), Some(nominal), "{seen}");
        }
        assert_eq!(nominal_gb(0), None);
        assert_eq!(nominal_gb(u64::MAX), None);
    }

    #[test]
    fn board_json_names_the_family() {
        let (b, _) = board("Jetson AGX Orin", &[], None);
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["family"], "jetson-orin");
        assert_eq!(json["model"], "Jetson AGX Orin");
    }
}
