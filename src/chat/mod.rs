//! What every API dialect shares.

pub mod gotmpl;
pub mod pyfmt;
pub mod template;

pub use template::{ChatTemplate, TemplateError};
