//! What every API dialect shares.

pub mod gotmpl;
pub mod pyfmt;
pub mod template;
pub mod tools;

pub use template::{ChatTemplate, TemplateError};
