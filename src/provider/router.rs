//! Model name → the providers to try, in order.
//!
//! 1. The first `[[routes]]` entry whose `model` matches (the same manifest by id or alias, or a
//!    `*` pattern on the name, case-insensitively) gives the chain as written; `local` drops out
//!    where this box runs no engines.
//! 2. Otherwise: this box's engines when a manifest knows the name, then every upstream whose
//!    `models` patterns match it, in config order (the fallbacks).
//!
//! An empty chain means no provider serves the name: 404.

use std::sync::Arc;

use super::config::{RouteConfig, UpstreamConfig, LOCAL};
use super::upstream::Upstream;
use crate::hub::Registry;
use crate::server::glob_match;

#[derive(Clone)]
pub enum Target {
    /// This machine's engines.
    Local,
    /// An upstream, with the model name to send it.
    Upstream { upstream: Arc<Upstream>, model: String },
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Self::Local => LOCAL,
            Self::Upstream { upstream, .. } => upstream.name(),
        }
    }
}

pub struct Providers {
    /// This box runs engines (false in the Ollama-proxy plan).
    pub local: bool,
    pub upstreams: Vec<Arc<Upstream>>,
    routes: Vec<RouteConfig>,
}

impl Providers {
    pub fn new(local: bool, upstreams: &[UpstreamConfig], routes: &[RouteConfig]) -> Self {
        Self {
            local,
            upstreams: upstreams.iter().cloned().map(|c| Arc::new(Upstream::new(c))).collect(),
            routes: routes.to_vec(),
        }
    }

    /// Only this machine's engines (tests, and a config without upstreams).
    pub fn local_only() -> Self {
        Self::new(true, &[], &[])
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// The providers to try for `model`, in order.
    pub fn chain(&self, model: &str, registry: &Registry) -> Vec<Target> {
        let local_manifest = registry.get(model);
        let matches = |pattern: &str| {
            glob_match(&pattern.to_lowercase(), &model.to_lowercase())
                || local_manifest.is_some_and(|m| registry.get(pattern).is_some_and(|p| p.id == m.id))
        };
        if let Some(route) = self.routes.iter().find(|r| matches(&r.model)) {
            let sent = route.upstream_model.clone().unwrap_or_else(|| model.to_owned());
            return route
                .providers
                .iter()
                .filter_map(|p| match p.as_str() {
                    LOCAL => (self.local && local_manifest.is_some()).then_some(Target::Local),
                    name => self.upstream(name).map(|u| Target::Upstream { upstream: u.clone(), model: sent.clone() }),
                })
                .collect();
        }
        let mut chain = Vec::new();
        if self.local && local_manifest.is_some() {
            chain.push(Target::Local);
        }
        for u in &self.upstreams {
            if u.serves(model) {
                chain.push(Target::Upstream { upstream: u.clone(), model: model.to_owned() });
            }
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::UpstreamKind;

    fn names(chain: &[Target]) -> Vec<String> {
        chain
            .iter()
            .map(|t| match t {
                Target::Local => "local".to_owned(),
                Target::Upstream { upstream, model } => format!("{}:{model}", upstream.name()),
            })
            .collect()
    }

    fn up(name: &str, models: &[&str]) -> UpstreamConfig {
        let mut c = UpstreamConfig::new(name, UpstreamKind::Ollama, "http://127.0.0.1:11435");
        c.models = models.iter().map(|s| s.to_string()).collect();
        c
    }

    #[test]
    fn chains() {
        let reg = Registry::embedded().unwrap();
        let ups = [up("pi", &["*"]), up("vision", &["qwen2*vl*", "llava*"])];
        let routes = [RouteConfig {
            model: "qwen2-vl-7b-instruct-awq".into(),
            providers: vec!["local".into(), "vision".into()],
            upstream_model: Some("qwen2.5vl:7b".into()),
        }];
        let p = Providers::new(true, &ups, &routes);
        // A local model: local first, then upstreams that take the name.
        assert_eq!(names(&p.chain("smollm2", &reg)), ["local", "pi:smollm2"]);
        // Unknown here: upstreams only, in config order.
        assert_eq!(names(&p.chain("llava:13b", &reg)), ["pi:llava:13b", "vision:llava:13b"]);
        assert_eq!(names(&p.chain("mistral", &reg)), ["pi:mistral"]);
        // A route, matched through an alias of its model, with the name rewritten.
        let vl_alias = reg.get("qwen2-vl-7b-instruct-awq").unwrap().aliases[0].clone();
        assert_eq!(names(&p.chain(&vl_alias, &reg)), ["local", "vision:qwen2.5vl:7b"]);
        // No local engines (the Pi): local drops out of chains.
        let pi = Providers::new(false, &ups, &routes);
        assert_eq!(names(&pi.chain("smollm2", &reg)), ["pi:smollm2"]);
        assert_eq!(names(&pi.chain(&vl_alias, &reg)), ["vision:qwen2.5vl:7b"]);
        // Nothing serves it.
        let none = Providers::new(false, &[up("vision", &["llava*"])], &[]);
        assert!(none.chain("smollm2", &reg).is_empty());
        assert_eq!(names(&Providers::local_only().chain("SmolLM2", &reg)), ["local"]);
        assert!(Providers::local_only().chain("mistral", &reg).is_empty());
    }
}
