//! `/openapi.json`: an OpenAPI 3.0 document whose schemas are generated (schemars) from the same
//! Rust types the handlers decode and encode, so it cannot drift from the wire.

use axum::http::StatusCode;
use axum::response::Response;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::error::json_response;
use super::{ollama, openai};

struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    request: Option<Value>,
    response: Value,
    /// Content type of a streamed 200, if the operation can stream.
    stream: Option<&'static str>,
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

/// The document (built per request; it is small).
pub fn document() -> Value {
    let mut g = SchemaSettings::openapi3().into_generator();
    let text = json!({ "type": "string" });
    let ops = vec![
        Op {
            method: "get",
            path: "/",
            summary: "Ollama liveness: `Ollama is running`",
            request: None,
            response: text.clone(),
            stream: None,
        },
        Op {
            method: "get",
            path: "/api/version",
            summary: "Ollama-compatible version",
            request: None,
            response: schema::<ollama::VersionResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "get",
            path: "/api/tags",
            summary: "Models present in the store",
            request: None,
            response: schema::<ollama::ListResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/api/show",
            summary: "Model details",
            request: Some(schema::<ollama::ModelRequest>(&mut g)),
            response: schema::<ollama::ShowResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "get",
            path: "/api/ps",
            summary: "Loaded models",
            request: None,
            response: schema::<ollama::PsResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/api/generate",
            summary: "Generate a completion (NDJSON stream by default)",
            request: Some(schema::<ollama::GenerateRequest>(&mut g)),
            response: schema::<ollama::GenerateResponse>(&mut g),
            stream: Some("application/x-ndjson"),
        },
        Op {
            method: "post",
            path: "/api/chat",
            summary: "Chat (NDJSON stream by default)",
            request: Some(schema::<ollama::ChatRequest>(&mut g)),
            response: schema::<ollama::ChatResponse>(&mut g),
            stream: Some("application/x-ndjson"),
        },
        Op {
            method: "post",
            path: "/api/embed",
            summary: "Embeddings (mean-pooled, L2-normalized)",
            request: Some(schema::<ollama::EmbedRequest>(&mut g)),
            response: schema::<ollama::EmbedResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/api/embeddings",
            summary: "Legacy embedding (mean-pooled, not normalized)",
            request: Some(schema::<ollama::EmbeddingsRequest>(&mut g)),
            response: schema::<ollama::EmbeddingsResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/api/pull",
            summary: "Download a model (NDJSON progress)",
            request: Some(schema::<ollama::ModelRequest>(&mut g)),
            response: schema::<ollama::ProgressResponse>(&mut g),
            stream: Some("application/x-ndjson"),
        },
        Op {
            method: "delete",
            path: "/api/delete",
            summary: "Delete a pulled model",
            request: Some(schema::<ollama::ModelRequest>(&mut g)),
            response: json!({}),
            stream: None,
        },
        Op {
            method: "get",
            path: "/v1/models",
            summary: "OpenAI model list",
            request: None,
            response: schema::<openai::ModelList>(&mut g),
            stream: None,
        },
        Op {
            method: "get",
            path: "/v1/models/{model}",
            summary: "One model",
            request: None,
            response: schema::<openai::ModelCard>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/v1/chat/completions",
            summary: "Chat completion (SSE with `stream: true`)",
            request: Some(schema::<openai::ChatCompletionRequest>(&mut g)),
            response: schema::<openai::ChatCompletion>(&mut g),
            stream: Some("text/event-stream"),
        },
        Op {
            method: "post",
            path: "/v1/completions",
            summary: "Text completion (SSE with `stream: true`)",
            request: Some(schema::<openai::CompletionRequest>(&mut g)),
            response: schema::<openai::Completion>(&mut g),
            stream: Some("text/event-stream"),
        },
        Op {
            method: "post",
            path: "/v1/embeddings",
            summary: "Embeddings (mean-pooled, L2-normalized)",
            request: Some(schema::<openai::EmbeddingRequest>(&mut g)),
            response: schema::<openai::EmbeddingResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/tokenize",
            summary: "Tokenize a prompt or messages",
            request: Some(schema::<openai::TokenizeRequest>(&mut g)),
            response: schema::<openai::TokenizeResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "post",
            path: "/detokenize",
            summary: "Token ids to text",
            request: Some(schema::<openai::DetokenizeRequest>(&mut g)),
            response: schema::<openai::DetokenizeResponse>(&mut g),
            stream: None,
        },
        Op {
            method: "get",
            path: "/version",
            summary: "Server version",
            request: None,
            response: schema::<openai::ServerVersion>(&mut g),
            stream: None,
        },
        Op {
            method: "get",
            path: "/health",
            summary: "200 (empty) when the models loaded at start are resident, else 503",
            request: None,
            response: json!({}),
            stream: None,
        },
        Op {
            method: "get",
            path: "/metrics",
            summary: "Prometheus metrics (vLLM names)",
            request: None,
            response: text.clone(),
            stream: None,
        },
    ];
    let mut paths = Map::new();
    for op in ops {
        let mut content = Map::new();
        content.insert("application/json".into(), json!({ "schema": op.response }));
        if let Some(ct) = op.stream {
            content.insert(ct.into(), json!({ "schema": op.response }));
        }
        let mut o = json!({
            "summary": op.summary,
            "responses": {
                "200": { "description": "OK", "content": content },
                "400": { "description": "Bad request: the message names the field and the limit" },
                "404": { "description": "Unknown model" },
            }
        });
        if let Some(req) = op.request {
            o["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": req } } });
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method] = o;
    }
    let schemas: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.0.3",
        "info": { "title": "zoe-llm", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Ollama-native and OpenAI-compatible API of the zoe-llm appliance" },
        "paths": paths,
        "components": { "schemas": schemas },
    })
}

pub async fn handler() -> Response {
    json_response(StatusCode::OK, &document())
}
