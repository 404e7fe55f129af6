//! Vision inputs: images turned into what a vision-language model's vision tower takes.
//!
//! Qwen2-VL sees an image as a grid of 14×14 patches at a size of its choosing (multiples of
//! 28 with a pixel budget, aspect ratio kept), normalized with CLIP's statistics, and merges
//! 2×2 patches into one LLM token. The model learned from pixels made by Hugging Face's
//! `Qwen2VLImageProcessor`, so [`preprocess`] reproduces that processor exactly (Pillow's
//! bicubic resampling included) rather than approximately: a "nearly the same" resize is
//! nearly-the-same input on every pixel, and exactness lets tests compare with transformers.
//!
//! Images are untrusted input: sizes are checked from the header before anything is decoded,
//! only PNG, JPEG and WebP decoders are compiled in, and every refusal is an [`ImageError`]
//! that says what to change (the servers turn it into a 400).

mod cache;
mod decode;
mod jpeg;
mod preprocess;
mod prompt;
mod resample;

pub use prompt::{AttachError, Vision};

pub use preprocess::{
    detect_format, preprocess, probe, smart_resize, ImageError, ImageFormat, ImageInput, PreprocessConfig, Probed,
    MAX_ASPECT_RATIO, SUPPORTED_FORMATS,
};
pub use resample::resize_bicubic_rgb8;
