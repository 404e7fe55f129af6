//! The deployment files in deploy/ agree with the server they deploy: the compose service
//! publishes `ServeConfig::default().port`, checks `/health` there and mounts the models
//! read-only where the image's `ZOE_MODELS` points; the Dockerfile's EXPOSE, HEALTHCHECK, CMD and
//! COPY lines match; the systemd unit is `Type=notify` with a watchdog; the example config holds
//! every `ServeConfig` key at its default and the env example documents every key and every
//! environment variable the binary reads; the Pi's config proxies the Ollama its drop-in moves
//! to 127.0.0.1:11435; the Grafana dashboard covers exactly the metrics the server exports.
//!
//! Syntax is the linters' job (scripts/lint-deploy: hadolint, `docker compose config`,
//! shellcheck, PromQL, systemd-analyze). compose.yaml is kept to a plain YAML subset that
//! [`yaml`] reads here without a YAML crate; anything outside it fails loudly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use zoe_llm::server::ServeConfig;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn port() -> u16 {
    ServeConfig::default().port
}

/// The field names of `ServeConfig`, as its `Deserialize` impl lists them (it has no `Serialize`
/// to enumerate them by): a deserializer that records the `fields` of `deserialize_struct`.
fn serve_config_keys() -> BTreeSet<&'static str> {
    use serde::de::{Deserialize, Deserializer, Visitor};

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("introspection only")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }
    struct Fields<'a>(&'a mut Option<&'static [&'static str]>);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = None;
    let _ = ServeConfig::deserialize(Fields(&mut fields));
    let keys: BTreeSet<_> = fields.expect("ServeConfig deserializes as a struct").iter().copied().collect();
    assert!(keys.contains("port") && keys.contains("stall_timeout"), "{keys:?}");
    keys
}

/// `#key = value` and `#[[table]]` lines are settings commented out; `# text` is prose.
fn uncomment_settings(toml_text: &str) -> String {
    toml_text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn config_from_text(text: &str) -> anyhow::Result<ServeConfig> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    ServeConfig::from_file(&path)
}

#[test]
fn example_config_holds_every_key_at_its_default() {
    let text = read("deploy/l4t/config.toml");
    let config = ServeConfig::from_file(&repo().join("deploy/l4t/config.toml")).expect("deploy/l4t/config.toml");
    assert_eq!(config, ServeConfig::default(), "deploy/l4t/config.toml must hold the defaults");

    // With the commented-out settings switched on, the file names each key exactly once (TOML
    // refuses a key twice) and is still a valid config (deny_unknown_fields, validation).
    let all = uncomment_settings(&text);
    let table: toml::Table = toml::from_str(&all).expect("the uncommented config is TOML");
    let named: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    let keys = serve_config_keys();
    let missing: Vec<_> = keys.difference(&named).collect();
    assert!(
        missing.is_empty(),
        "deploy/l4t/config.toml lacks these ServeConfig keys (add them, commented if optional): {missing:?}"
    );
    assert_eq!(named, keys);
    let example = config_from_text(&all).unwrap_or_else(|e| panic!("uncommented deploy/l4t/config.toml: {e:#}"));
    // Every optional key is an example value there, so each one was really read.
    assert!(example.backend.is_some() && example.max_num_seqs.is_some() && example.threads.is_some());
    assert!(example.kv_cache_bytes.is_some() && example.memory_budget_bytes.is_some());
    assert!(!example.upstreams.is_empty() && !example.routes.is_empty());
}

#[test]
fn pi_config_proxies_the_ollama_its_drop_in_moves() {
    use zoe_llm::plan::Backend;
    use zoe_llm::provider::config::UpstreamKind;
    let config = ServeConfig::from_file(&repo().join("deploy/pi/config.toml")).expect("deploy/pi/config.toml");
    assert_eq!(config.backend, Some(Backend::OllamaProxy));
    assert_eq!(config.port, port());
    assert_eq!(config.upstreams.len(), 1, "{:?}", config.upstreams);
    let up = &config.upstreams[0];
    assert_eq!(up.kind, UpstreamKind::Ollama);
    assert_eq!(up.url.trim_end_matches('/'), "http://127.0.0.1:11435");

    let drop_in = unit_file(&read("deploy/pi/ollama.service.d/zoe-llm.conf"));
    let envs = drop_in.all("Service", "Environment");
    assert!(envs.iter().any(|e| e.trim_matches('"') == "OLLAMA_HOST=127.0.0.1:11435"), "ollama drop-in: {envs:?}");
    let zoe_drop_in = unit_file(&read("deploy/pi/zoe-llm.service.d/pi.conf"));
    assert!(zoe_drop_in.all("Unit", "Wants").iter().any(|w| w.split_whitespace().any(|u| u == "ollama.service")));
}

/// Environment variables the binary reads by name (`env::var("X")`, `const …_ENV: &str = "X"`)
/// in src/ and provider-probe/src, test code left out.
fn env_vars_read() -> BTreeSet<String> {
    fn scan(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scan(&path, out);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy();
            if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // An inline test module ends the code (`mod tests;` declarations do not).
            let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap();
            for pat in ["env::var(\"", "env::var_os(\"", "_ENV: &str = \""] {
                for (i, _) in code.match_indices(pat) {
                    let rest = &code[i + pat.len()..];
                    let var: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
                        .collect();
                    if rest[var.len()..].starts_with('"') && !var.is_empty() {
                        out.insert(var);
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    scan(&repo().join("src"), &mut out);
    scan(&repo().join("provider-probe/src"), &mut out);
    out
}

#[test]
fn env_example_documents_every_setting_and_variable() {
    let text = read("deploy/l4t/zoe-llm.env.example");
    let words: BTreeSet<&str> =
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
    let undocumented: Vec<_> = serve_config_keys().into_iter().filter(|k| !words.contains(k)).collect();
    assert!(
        undocumented.is_empty(),
        "deploy/l4t/zoe-llm.env.example does not mention these ServeConfig keys: {undocumented:?}"
    );

    // Variables a person may set appear as `NAME=` (commented or not); those the system sets are
    // named in prose.
    let assignable: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.trim_start_matches('#').split_once('='))
        .map(|(name, _)| name)
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()))
        .collect();
    let set_by_system = ["NOTIFY_SOCKET", "HOSTNAME", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"];
    let mut read_by_binary = env_vars_read();
    assert!(read_by_binary.contains("ZOE_MODELS") && read_by_binary.contains("OLLAMA_ORIGINS"), "{read_by_binary:?}");
    // tracing's EnvFilter reads it without naming it in our code.
    read_by_binary.insert("RUST_LOG".into());
    for var in &read_by_binary {
        if set_by_system.contains(&var.as_str()) {
            assert!(words.contains(var.as_str()), "zoe-llm.env.example should say that the system sets {var}");
        } else {
            assert!(
                assignable.contains(var.as_str()),
                "deploy/l4t/zoe-llm.env.example has no `{var}=` line (the binary reads it)"
            );
        }
    }
}

// --- Dockerfile -------------------------------------------------------------------------------

/// Instructions of a Dockerfile: (KEYWORD, arguments), continuation lines joined, comments out.
fn dockerfile(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (kw, args) = current.trim().split_once(char::is_whitespace).unwrap_or((current.trim(), ""));
        out.push((kw.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

/// The exec form `["a", "b"]` of CMD, ENTRYPOINT, HEALTHCHECK … CMD.
fn exec_form(args: &str) -> Vec<String> {
    let v: Vec<String> =
        serde_json::from_str(args).unwrap_or_else(|e| panic!("expected the JSON exec form, got {args:?}: {e}"));
    v
}

struct Image {
    from: String,
    expose: Vec<String>,
    healthcheck: Vec<String>,
    user: String,
    env: Vec<(String, String)>,
    /// (source, destination) of each COPY.
    copies: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Image {
    fn env(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("Dockerfile: no ENV {key}"))
    }
}

fn image() -> Image {
    let mut img = Image {
        from: String::new(),
        expose: Vec::new(),
        healthcheck: Vec::new(),
        user: "root".into(),
        env: Vec::new(),
        copies: Vec::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
    };
    for (kw, args) in dockerfile(&read("deploy/l4t/Dockerfile")) {
        match kw.as_str() {
            // The last FROM is the runtime stage; what it inherits is reset.
            "FROM" => {
                img.from = args.split_whitespace().next().unwrap().to_owned();
                img.copies.clear();
            }
            "EXPOSE" => img.expose.extend(args.split_whitespace().map(str::to_owned)),
            "HEALTHCHECK" => {
                let (_, cmd) = args.split_once("CMD ").expect("HEALTHCHECK … CMD [...]");
                img.healthcheck = exec_form(cmd.trim());
            }
            "USER" => img.user = args,
            "ENV" => {
                for pair in args.split_whitespace() {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("ENV in KEY=value form: {pair}"));
                    img.env.push((k.to_owned(), v.to_owned()));
                }
            }
            "COPY" => {
                let words: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                assert_eq!(words.len(), 2, "COPY with one source: {args}");
                img.copies.push((words[0].to_owned(), words[1].to_owned()));
            }
            "ENTRYPOINT" => img.entrypoint = exec_form(&args),
            "CMD" => img.cmd = exec_form(&args),
            _ => {}
        }
    }
    img
}

/// The value after `flag` in an argument list.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn health_url() -> String {
    format!("http://127.0.0.1:{}/health", port())
}

#[test]
fn dockerfile_matches_the_server() {
    let img = image();
    let (name, tag) = img.from.rsplit_once(':').expect("the base image has a tag");
    assert!(name.starts_with("nvcr.io/nvidia/l4t-"), "runtime stage on an L4T base: {}", img.from);
    assert!(tag != "latest" && !tag.is_empty());

    assert!(
        img.expose.iter().any(|e| *e == port().to_string() || *e == format!("{}/tcp", port())),
        "EXPOSE {:?} lacks the default port {}",
        img.expose,
        port()
    );
    assert!(
        img.healthcheck.iter().any(|a| *a == health_url()),
        "HEALTHCHECK {:?} must GET {}",
        img.healthcheck,
        health_url()
    );
    assert!(!["root", "0", "0:0", "root:root"].contains(&img.user.as_str()), "runs as root: USER {}", img.user);

    // The cross-built binary, the health check and the default config come from the repo.
    let binary = img
        .copies
        .iter()
        .find(|(src, _)| src == "target/aarch64-unknown-linux-gnu/release/zoe-llm")
        .expect("COPY of the cross-built aarch64 binary");
    assert_eq!(img.entrypoint, vec![binary.1.clone()]);
    let ignore = read("deploy/l4t/Dockerfile.dockerignore");
    for (src, _) in &img.copies {
        assert!(ignore.lines().any(|l| l.trim() == format!("!{src}")), "Dockerfile.dockerignore must let {src} in");
        if !src.starts_with("target/") {
            assert!(repo().join(src).is_file(), "COPY source {src} is not in the repository");
        }
    }
    let check = img.copies.iter().find(|(_, dst)| *dst == img.healthcheck[0]);
    assert!(check.is_some(), "the HEALTHCHECK program {} is not copied into the image", img.healthcheck[0]);

    assert_eq!(img.env(zoe_llm::hub::store::MODELS_ENV), "/models");
    assert_eq!(img.cmd.first().map(String::as_str), Some("serve"));
    assert_eq!(flag(&img.cmd, "--host"), Some("0.0.0.0"), "the container must listen beyond its loopback");
    assert_eq!(flag(&img.cmd, "--port").map(|p| p.parse::<u16>().unwrap()).unwrap_or(port()), port());
    let config = flag(&img.cmd, "--config").expect("CMD passes --config");
    assert!(img.copies.iter().any(|(src, dst)| dst == config && src == "deploy/l4t/config.toml"));
}

// --- compose.yaml -----------------------------------------------------------------------------

/// A reader for the YAML subset compose.yaml keeps to: block mappings and sequences by
/// indentation (spaces), one-line scalars (plain, 'single' or "double" quoted) and one-line
/// flow sequences of scalars, comments. Anchors, aliases, tags, block scalars and flow mappings
/// are refused rather than misread.
mod yaml {
    use serde_json::{Map, Value};

    pub fn parse(text: &str) -> Value {
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            assert!(!raw.contains('\t'), "compose.yaml:{}: tab", n + 1);
            let content = strip_comment(raw).trim_end();
            if content.trim().is_empty() {
                continue;
            }
            let indent = content.len() - content.trim_start().len();
            lines.push((indent, content.trim_start().to_owned(), n + 1));
        }
        let mut i = 0;
        let v = block(&mut lines, &mut i, 0);
        assert_eq!(i, lines.len(), "compose.yaml:{}: unexpected indentation", lines.get(i).map_or(0, |l| l.2));
        v
    }

    fn strip_comment(line: &str) -> &str {
        let (mut single, mut double) = (false, false);
        let mut prev = ' ';
        for (i, c) in line.char_indices() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                '#' if !single && !double && prev.is_whitespace() => return &line[..i],
                _ => {}
            }
            prev = c;
        }
        line
    }

    type Lines = Vec<(usize, String, usize)>;

    fn block(lines: &mut Lines, i: &mut usize, indent: usize) -> Value {
        let is_item = |s: &str| s == "-" || s.starts_with("- ");
        if is_item(&lines[*i].1) {
            let mut seq = Vec::new();
            while *i < lines.len() && lines[*i].0 == indent && is_item(&lines[*i].1) {
                let rest = lines[*i].1[1..].trim_start().to_owned();
                if rest.is_empty() {
                    *i += 1;
                    seq.push(nested(lines, i, indent));
                } else if key_value(&rest).is_some() {
                    // "- key: value": a mapping whose keys sit two columns further in.
                    lines[*i] = (indent + 2, rest, lines[*i].2);
                    seq.push(block(lines, i, indent + 2));
                } else {
                    seq.push(scalar(&rest, lines[*i].2));
                    *i += 1;
                }
            }
            return Value::Array(seq);
        }
        let mut map = Map::new();
        while *i < lines.len() && lines[*i].0 == indent && !is_item(&lines[*i].1) {
            let (line, n) = (lines[*i].1.clone(), lines[*i].2);
            let (key, value) = key_value(&line).unwrap_or_else(|| panic!("compose.yaml:{n}: expected `key: value`"));
            *i += 1;
            let v = if value.is_empty() { nested(lines, i, indent) } else { scalar(value, n) };
            assert!(map.insert(unquote(key, n), v).is_none(), "compose.yaml:{n}: key twice");
        }
        Value::Object(map)
    }

    /// The block under a `key:` or `-` line, or null when nothing is indented beneath it. A
    /// sequence may sit at its parent key's own indentation, as YAML allows.
    fn nested(lines: &mut Lines, i: &mut usize, indent: usize) -> Value {
        match lines.get(*i) {
            Some((ind, _, _)) if *ind > indent => {
                let ind = *ind;
                block(lines, i, ind)
            }
            Some((ind, s, _)) if *ind == indent && (s == "-" || s.starts_with("- ")) => block(lines, i, indent),
            _ => Value::Null,
        }
    }

    fn key_value(line: &str) -> Option<(&str, &str)> {
        if line.starts_with(['"', '\'']) {
            let q = line.chars().next().unwrap();
            let end = line[1..].find(q)? + 2;
            let rest = line[end..].strip_prefix(':')?;
            return (rest.is_empty() || rest.starts_with(' ')).then(|| (&line[..end], rest.trim()));
        }
        if let Some(key) = line.strip_suffix(':') {
            return (!key.contains(": ")).then_some((key, ""));
        }
        line.split_once(": ").map(|(k, v)| (k, v.trim()))
    }

    fn unquote(key: &str, n: usize) -> String {
        match scalar(key, n) {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }

    fn scalar(s: &str, n: usize) -> Value {
        let s = s.trim();
        assert!(
            !s.starts_with(['&', '*', '!', '|', '>', '{', '@', '`']),
            "compose.yaml:{n}: `{s}` is outside the YAML subset tests/deploy.rs reads"
        );
        if let Some(body) = s.strip_prefix('"') {
            let body = body.strip_suffix('"').unwrap_or_else(|| panic!("compose.yaml:{n}: unterminated string"));
            return Value::String(
                serde_json::from_str(&format!("\"{body}\"")).unwrap_or_else(|e| panic!("compose.yaml:{n}: {e}")),
            );
        }
        if let Some(body) = s.strip_prefix('\'') {
            let body = body.strip_suffix('\'').unwrap_or_else(|| panic!("compose.yaml:{n}: unterminated string"));
            return Value::String(body.replace("''", "'"));
        }
        if let Some(body) = s.strip_prefix('[') {
            let body =
                body.strip_suffix(']').unwrap_or_else(|| panic!("compose.yaml:{n}: a flow sequence on one line"));
            return Value::Array(split_flow(body).iter().map(|item| scalar(item, n)).collect());
        }
        match s {
            "~" | "null" => Value::Null,
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => s.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(s.to_owned())),
        }
    }

    fn split_flow(body: &str) -> Vec<&str> {
        let (mut out, mut start, mut single, mut double) = (Vec::new(), 0, false, false);
        for (i, c) in body.char_indices() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                ',' if !single && !double => {
                    out.push(body[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        if !body[start..].trim().is_empty() {
            out.push(body[start..].trim());
        }
        out
    }

    #[test]
    fn reads_the_subset() {
        let v = parse(
            "a:\n  b: 1 # note\n  c: \"x # y\"\n  d:\n  - p\n  - 'q'\n  e:\n    - k: v\n      l: [1, \"two\", three]\n  f:\nz: true\n",
        );
        assert_eq!(
            v,
            serde_json::json!({"a": {"b": 1, "c": "x # y", "d": ["p", "q"], "e": [{"k": "v", "l": [1, "two", "three"]}], "f": null}, "z": true})
        );
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn compose_service_matches_the_server_and_the_image() {
    let compose = yaml::parse(&read("deploy/l4t/compose.yaml"));
    let svc = &compose["services"]["zoe-llm"];
    assert!(svc.is_object(), "compose.yaml: no service zoe-llm");
    let img = image();

    assert_eq!(svc["runtime"], "nvidia");
    let restart = svc["restart"].as_str().unwrap_or("");
    assert!(
        ["always", "unless-stopped", "on-failure"].contains(&restart) || restart.starts_with("on-failure:"),
        "restart: {restart}"
    );
    assert_eq!(svc["build"]["dockerfile"], "deploy/l4t/Dockerfile");
    let context = repo().join("deploy/l4t").join(svc["build"]["context"].as_str().unwrap());
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "the build context is the repository root"
    );

    // Published port: the server's default, on both sides.
    let ports = strings(&svc["ports"]);
    let published: Vec<(u16, u16)> = ports
        .iter()
        .map(|p| {
            let p = p.trim_end_matches("/tcp");
            let mut parts = p.rsplitn(3, ':');
            let container = parts.next().unwrap().parse().unwrap();
            let host = parts.next().unwrap_or_else(|| panic!("ports: {p} publishes no host port")).parse().unwrap();
            (host, container)
        })
        .collect();
    assert_eq!(published, vec![(port(), port())], "ports: {ports:?}");
    assert!(img.expose.iter().any(|e| e.trim_end_matches("/tcp") == port().to_string()));

    // The health check: /health on that port, the same command as the image's.
    let test = strings(&svc["healthcheck"]["test"]);
    assert_eq!(test[0], "CMD", "healthcheck.test in exec form");
    assert_eq!(test[1..], img.healthcheck[..], "compose and Dockerfile health checks differ");
    assert!(test.contains(&health_url()));

    // The command: the image's, listening on every interface.
    let command = strings(&svc["command"]);
    assert_eq!(command, img.cmd, "compose command and Dockerfile CMD differ");

    // Volumes: models read-only where ZOE_MODELS points, the config read-only where --config
    // points, state and cache writable where HOME and XDG_CACHE_HOME point.
    let volumes = svc["volumes"].as_array().expect("volumes in the long syntax");
    let find = |target: &str| {
        volumes.iter().find(|v| v["target"] == target).unwrap_or_else(|| panic!("compose.yaml: no volume at {target}"))
    };
    let models = find(img.env(zoe_llm::hub::store::MODELS_ENV));
    assert_eq!(models["read_only"], true, "models must be mounted read-only: {models}");
    let config_path = flag(&command, "--config").expect("--config");
    let config = find(config_path);
    assert_eq!(config["read_only"], true);
    assert!(repo().join("deploy/l4t").join(config["source"].as_str().unwrap()).is_file());
    for var in ["HOME", "XDG_CACHE_HOME"] {
        let v = find(img.env(var));
        assert_ne!(v["read_only"], true, "{var} must be writable");
    }

    // Environment from the env file whose example is checked in.
    let env_files = svc["env_file"].as_array().expect("env_file list");
    let env = env_files.iter().map(|e| e.get("path").unwrap_or(e).as_str().unwrap()).collect::<Vec<_>>();
    assert_eq!(env, ["zoe-llm.env"]);
    assert!(repo().join("deploy/l4t/zoe-llm.env.example").is_file());
}

// --- systemd ----------------------------------------------------------------------------------

struct UnitFile(Vec<(String, String, String)>);

impl UnitFile {
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.0.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
    }
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key)[..] {
            [v] => v,
            ref vs => panic!("[{section}] {key}: expected one value, got {vs:?}"),
        }
    }
}

fn unit_file(text: &str) -> UnitFile {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("unit line without `=`: {line}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    UnitFile(out)
}

#[test]
fn systemd_unit_notifies_and_is_sandboxed() {
    let unit = unit_file(&read("deploy/systemd/zoe-llm.service"));
    let s = |k: &'static str| unit.one("Service", k);
    assert_eq!(s("Type"), "notify", "the binary sends READY=1 and WATCHDOG=1");
    assert_eq!(s("NotifyAccess"), "main");
    let watchdog: u64 = s("WatchdogSec").trim_end_matches('s').parse().expect("WatchdogSec in seconds");
    assert_eq!(watchdog, 30);
    assert_eq!(s("Restart"), "on-failure");
    assert!(!s("RestartSec").is_empty() && !s("TimeoutStopSec").is_empty());

    let exec: Vec<String> = s("ExecStart").split_whitespace().map(str::to_owned).collect();
    assert_eq!(exec[..2], ["/usr/local/bin/zoe-llm", "serve"]);
    assert_eq!(flag(&exec, "--config"), Some("/etc/zoe-llm/config.toml"));

    // The models directory: named by the variable the binary reads, read-only.
    let envs: Vec<&str> = unit.all("Service", "Environment").into_iter().flat_map(str::split_whitespace).collect();
    let prefix = format!("{}=", zoe_llm::hub::store::MODELS_ENV);
    let models = envs.iter().find_map(|e| e.strip_prefix(&prefix)).expect("Environment=ZOE_MODELS=…");
    let read_only: Vec<&str> =
        unit.all("Service", "ReadOnlyPaths").into_iter().flat_map(str::split_whitespace).collect();
    assert!(
        read_only.iter().any(|p| p.trim_start_matches('-') == models),
        "ReadOnlyPaths {read_only:?} lacks {models}"
    );

    assert!(s("DynamicUser") == "yes" || !unit.all("Service", "User").is_empty(), "not as root");
    for (key, value) in
        [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes")]
    {
        assert_eq!(s(key), value, "[Service] {key}");
    }
    assert_eq!(s("StateDirectory"), "zoe-llm");
    assert_eq!(s("CacheDirectory"), "zoe-llm");
    assert_eq!(unit.one("Install", "WantedBy"), "multi-user.target");
}

// --- Grafana ----------------------------------------------------------------------------------

/// Metric names in `text`: `vllm:…` and `zoe_…` tokens.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["vllm:", "zoe_"] {
        for (i, _) in text.match_indices(prefix) {
            if text[..i].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':')
                .collect();
            // `zoe_*` in prose is no name.
            if name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn grafana_dashboard_covers_exactly_the_exported_metrics() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/zoe-llm.json")).expect("zoe-llm.json is JSON");
    let vars = dash["templating"]["list"].as_array().expect("templating variables");
    let ds = vars.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());

    // Every query of every panel (rows nest panels).
    let mut exprs = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"]["uid"],
                ds_ref.as_str(),
                "panel {}: its query must use the datasource variable",
                p["title"]
            );
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        exprs.push(v["definition"].as_str().unwrap().to_owned());
    }

    // What the server exports: the names in src/server/metrics.rs (histograms add suffixes).
    let exported = metric_tokens(&read("src/server/metrics.rs"));
    assert!(exported.contains("vllm:num_requests_running") && exported.contains("zoe_upstream_up"), "{exported:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_tokens(e) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
                .map_or(name.clone(), str::to_owned);
            assert!(
                exported.contains(&base),
                "the dashboard asks for {name}, which src/server/metrics.rs does not export"
            );
            used.insert(base);
        }
    }
    let unused: Vec<_> = exported.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "deploy/grafana/zoe-llm.json shows nothing of {unused:?} (deploy/grafana/make-dashboard.py)"
    );
}
