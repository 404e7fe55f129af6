//! One error type for every handler, written in the shape of the dialect that asked.
//!
//! Ollama: `{"error":"<message>"}`. OpenAI (vLLM ≥ 0.10.1 / OpenAI envelope):
//! `{"error":{"message","type","param","code"}}` with `code` the HTTP status. Model-not-found
//! texts differ per dialect because clients grep them: Ollama `model '<m>' not found`, OpenAI
//! ``The model `<m>` does not exist.``. Bad input is always 4xx; 500 is kept for the engine
//! failing, never for something the client sent.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

#[derive(Clone, Debug, PartialEq)]
pub enum ApiError {
    /// 400; `param` names the offending field (dotted path) when there is one.
    BadRequest { message: String, param: Option<String> },
    /// 404 for a model name nothing resolves to (or that is not pulled).
    ModelNotFound { model: String },
    /// 404 with a message of its own.
    NotFound(String),
    /// 413: the body is over the configured limit.
    TooLarge { limit: usize },
    /// 503: the model's queue is full.
    Busy,
    /// 501: an endpoint or feature this build does not provide.
    NotImplemented(String),
    /// 503 with a reason (engine stopped, model cannot run here).
    Unavailable(String),
    /// 500: the engine failed on valid input.
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: None }
    }

    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: Some(param.to_owned()) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. } | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn message(&self, dialect: Dialect) -> String {
        match (self, dialect) {
            (Self::ModelNotFound { model }, Dialect::Ollama) => format!("model '{model}' not found"),
            (Self::ModelNotFound { model }, Dialect::OpenAi) => format!("The model `{model}` does not exist."),
            (Self::BadRequest { message, .. }, _)
            | (Self::NotFound(message), _)
            | (Self::NotImplemented(message), _)
            | (Self::Unavailable(message), _)
            | (Self::Internal(message), _) => message.clone(),
            (Self::TooLarge { limit }, _) => format!("request body is larger than the limit of {limit} bytes"),
            (Self::Busy, _) => "server busy, please try again.  maximum pending requests exceeded".to_owned(),
        }
    }

    /// The error object as JSON in `dialect`'s shape (also used for mid-stream error lines).
    pub fn body(&self, dialect: Dialect) -> serde_json::Value {
        let message = self.message(dialect);
        match dialect {
            Dialect::Ollama => serde_json::json!({ "error": message }),
            Dialect::OpenAi => {
                let status = self.status();
                let kind = match status {
                    StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "BadRequestError",
                    StatusCode::NOT_FOUND => "NotFoundError",
                    StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
                    StatusCode::NOT_IMPLEMENTED => "NotImplementedError",
                    _ => "InternalServerError",
                };
                let param = match self {
                    Self::BadRequest { param, .. } => param.clone(),
                    _ => None,
                };
                serde_json::json!({
                    "error": { "message": message, "type": kind, "param": param, "code": status.as_u16() }
                })
            }
        }
    }

    pub fn into_response_for(self, dialect: Dialect) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self.message(dialect), "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self.message(dialect), "request rejected");
        }
        let mut resp = json_response(status, &self.body(dialect));
        if matches!(self, Self::Busy) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Ollama,
    OpenAi,
}

/// A handler error in Ollama's shape.
pub struct OllamaError(pub ApiError);
/// A handler error in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<OllamaError> for ApiError {
    fn from(e: OllamaError) -> Self {
        e.0
    }
}

impl From<OpenAiError> for ApiError {
    fn from(e: OpenAiError) -> Self {
        e.0
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.into_response_for(Dialect::Ollama)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.into_response_for(Dialect::OpenAi)
    }
}

/// `value` as a JSON response with `status` (`application/json; charset=utf-8`).
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(value).expect("wire types serialize");
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    resp
}

/// Reads the whole body (at most `limit` bytes) and decodes it as `T`. Errors name the field:
/// `messages[0].content: invalid type: integer `3`, expected a string`. An empty body is
/// `missing request body`, as in Ollama. The `Content-Type` is not checked (Ollama does not;
/// `curl -d` sends a form type).
pub async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    parse_json(&read_bytes(body, limit).await?)
}

/// The whole body, at most `limit` bytes (413 beyond).
pub async fn read_bytes(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            // `to_bytes` reports the limit as a boxed `LengthLimitError` in the source chain.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(ApiError::TooLarge { limit });
                }
                source = s.source();
            }
            Err(ApiError::bad(format!("could not read the request body: {e}")))
        }
    }
}

/// Decodes `bytes` as `T` with field-naming errors (see [`read_json`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("missing request body"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let what = if inner.is_syntax() || inner.is_eof() { "invalid JSON" } else { "invalid request" };
            if path == "." || path.is_empty() {
                Err(ApiError::bad(format!("{what}: {inner}")))
            } else {
                Err(ApiError::bad_field(&path, format!("{what}: {path}: {inner}")))
            }
        }
    }
}
