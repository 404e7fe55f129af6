//! Vision inputs: images turned into what a vision-language model's vision tower takes.
//!
//! Qwen2-VL learned from pixels made by Hugging Face's `Qwen2VLImageProcessor`, which resizes
//! with Pillow's bicubic filter; [`resize_bicubic_rgb8`] reproduces that filter bit for bit.

mod resample;

pub use resample::resize_bicubic_rgb8;
