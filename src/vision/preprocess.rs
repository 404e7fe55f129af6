//! Image bytes → Qwen2-VL `pixel_values`, as Hugging Face's slow `Qwen2VLImageProcessor`
//! (transformers 4.46.3, Pillow) computes them from the same file.
//!
//! Steps, each matched to what transformers does (transformers 4.46.3 with Pillow 11.0.0, the
//! Pillow of its day; see tests/fixtures/vision/make_goldens.py for what Pillow 13 changed):
//! 1. Limits before any pixel is decoded: the file size, a recognized format (PNG, JPEG,
//!    WebP; anything else is named and refused), the dimensions from the header (no side of
//!    0, at most `max_source_pixels`: a 100-byte PNG can claim 30000×30000), and the target
//!    size, so that an image smart_resize refuses is refused before it is decoded. The
//!    decoder gets `image::Limits` as a second line.
//! 2. Decode — JPEG with libjpeg-turbo, the decoder inside Pillow, set up as Pillow sets it up
//!    (`super::jpeg`); PNG and WebP with the `image` crate — then orient as
//!    `image_utils.load_image` does with Pillow's `exif_transpose`: the EXIF orientation tag, or
//!    when EXIF has none and the file is a PNG, XMP's `tiff:Orientation` (Pillow 11 reads XMP
//!    orientation from PNGs only).
//! 3. RGB as Pillow's `convert("RGB")`: gray is replicated, alpha is dropped (not composited:
//!    transformers 4.46's `convert_to_rgb` and `load_image` both call `convert("RGB")`;
//!    qwen-vl-utils, which composites on white, is not what the HF processor does), 16-bit
//!    samples keep their high byte.
//! 4. [`smart_resize`] to multiples of 28, then Pillow's BICUBIC on the 8-bit image
//!    ([`resize_bicubic_rgb8`], bit-exact).
//! 5. `x · (1/255)` (in f64, stored as f32), then `(x − mean) / std` in f32, per channel: the
//!    same roundings as numpy's, so equal bytes give equal floats.
//! 6. The frame repeated to `temporal_patch_size`, cut into 14×14 patches, rows in 2×2 merge
//!    blocks (see [`preprocess`]).
//!
//! Exactness: PNG, WebP (lossy and lossless) and JPEG (baseline and progressive, every chroma
//! subsampling, CMYK) decode to the same bytes as Pillow's libpng/libwebp/libjpeg-turbo (on
//! every golden file), and everything after decoding is exact, so `pixel_values` equal
//! transformers' bit for bit (tests/vision_preprocess.rs). Known departures, all on unusual
//! files: 16-bit grayscale PNGs (Pillow clips them to 255, i.e. near-white; we keep the high
//! byte), and an EXIF block that follows the image data in a PNG (Pillow sees it, `image`
//! does not).

use std::sync::Arc;

use image::metadata::Orientation;
use image::DynamicImage;
use sha2::{Digest, Sha256};

use super::decode::{check_jpeg_complete, Source};
use super::resample::resize_bicubic_rgb8;

/// The formats [`preprocess`] accepts, for messages.
pub const SUPPORTED_FORMATS: &str = "PNG, JPEG, WebP";

/// Largest side ratio smart_resize accepts (transformers and qwen-vl-utils alike).
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Preprocessing parameters: the model's `preprocessor_config.json` plus our input limits.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    /// Lower bound on the resized image's pixel count.
    pub min_pixels: usize,
    /// Upper bound on the resized image's pixel count: it sets the vision tower's cost
    /// (`max_pixels / 784` LLM tokens at most).
    pub max_pixels: usize,
    /// Side of a vision patch in pixels.
    pub patch_size: usize,
    /// Frames per patch: a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Patches merged into one LLM token along each side.
    pub merge_size: usize,
    /// Per-channel (R, G, B) mean, after scaling to 0..1. f64 as in the JSON config: like
    /// numpy, the normalization rounds it to f32 from there.
    pub image_mean: [f64; 3],
    /// Per-channel (R, G, B) standard deviation.
    pub image_std: [f64; 3],
    /// Largest accepted file, in bytes.
    pub max_file_bytes: usize,
    /// Largest accepted source image (width × height from its header), in pixels.
    pub max_source_pixels: u64,
}

impl Default for PreprocessConfig {
    /// Qwen2-VL-7B-Instruct's preprocessor_config.json (min 56·56, max 16384·28·28, OpenAI
    /// CLIP mean and std), 20 MiB files and 50-megapixel sources.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 12_845_056,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            max_file_bytes: 20 << 20,
            max_source_pixels: 50_000_000,
        }
    }
}

impl PreprocessConfig {
    /// Resized sides are multiples of this (28 for Qwen2-VL).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Floats per `pixel_values` row: 3 channels × frames × patch² (1176 for Qwen2-VL).
    pub fn row_len(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Checks the parameters once, at load time (`preprocess` checks again per call).
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |why: &str| Err(ImageError::Config(why.to_string()));
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return bad("patch_size, merge_size and temporal_patch_size must be positive");
        }
        if self.min_pixels > self.max_pixels {
            return bad("min_pixels is larger than max_pixels");
        }
        if self.image_std.iter().any(|&s| s as f32 == 0.0 || !(s as f32).is_finite()) {
            return bad("image_std must be finite and non-zero");
        }
        Ok(())
    }
}

/// A preprocessed image, ready for the vision tower. (`Debug` shows the shape, not the
/// millions of floats.)
#[derive(Clone, PartialEq)]
pub struct ImageInput {
    /// `rows × row_len` floats (`rows = grid_t · grid_h · grid_w`, `row_len = 1176` for
    /// Qwen2-VL), row-major: one row per 14×14 patch, rows grouped by 2×2 merge block.
    pub pixel_values: Vec<f32>,
    /// `(grid_t, grid_h, grid_w)`: frames/temporal_patch_size, and the resized height and
    /// width in patches (transformers' `image_grid_thw`).
    pub grid_thw: [usize; 3],
    /// Patches merged per LLM token along each side (2 for Qwen2-VL).
    pub merge_size: usize,
    /// SHA-256 of the image bytes: a prefix-cache key for the image's tokens, valid as long
    /// as the preprocessing config is the same.
    pub hash: [u8; 32],
    /// The tower's output for this image when the model had it cached (then `pixel_values` is
    /// empty and the tower does not run for it).
    pub embeds: Option<Arc<[f32]>>,
}

impl std::fmt::Debug for ImageInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hash: String = self.hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        f.debug_struct("ImageInput")
            .field("grid_thw", &self.grid_thw)
            .field("pixel_values", &format_args!("[{} f32]", self.pixel_values.len()))
            .field("merge_size", &self.merge_size)
            .field("hash", &format_args!("{hash}…"))
            .finish()
    }
}

impl ImageInput {
    /// Number of `pixel_values` rows (patches).
    pub fn rows(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Floats per row.
    pub fn row_len(&self) -> usize {
        self.pixel_values.len() / self.rows()
    }

    /// How many `<|image_pad|>` tokens stand for this image in the prompt:
    /// `grid_t · grid_h · grid_w / merge_size²`.
    pub fn llm_tokens(&self) -> usize {
        self.rows() / (self.merge_size * self.merge_size)
    }
}

/// Why an image was refused. Every case but [`ImageError::Config`] is the client's (a 400): the
/// messages say what to change.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("the image file is {size} bytes, more than the limit of {limit} bytes")]
    FileTooLarge { size: usize, limit: usize },
    #[error("{format} images are not supported (supported: {SUPPORTED_FORMATS})")]
    UnsupportedFormat { format: &'static str },
    #[error("the data is not an image in a supported format (supported: {SUPPORTED_FORMATS}); it starts with {start}")]
    UnknownFormat { start: String },
    #[error("the {format} image is {width}x{height}: it has no pixels")]
    ZeroSize { format: &'static str, width: u32, height: u32 },
    #[error("the image is {width}x{height} = {pixels} pixels, more than the limit of {limit} pixels; scale it down")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("the image is {width}x{height}: both sides must be at least {min} pixels")]
    TooSmall { width: usize, height: usize, min: usize },
    #[error("the image is {width}x{height}: its aspect ratio {ratio:.1} is more than the limit of {MAX_ASPECT_RATIO}")]
    AspectRatio { width: usize, height: usize, ratio: f64 },
    #[error("the image is {width}x{height}: too elongated to fit in {max_pixels} pixels with both sides multiples of {factor}")]
    CannotFit { width: usize, height: usize, max_pixels: usize, factor: usize },
    #[error("the {format} data is truncated (the file ends before the image does)")]
    Truncated { format: &'static str },
    #[error("the {format} data is corrupt or truncated: {detail}")]
    Corrupt { format: &'static str, detail: String },
    #[error("this {format} image uses a feature that is not supported: {detail}")]
    UnsupportedFeature { format: &'static str, detail: String },
    #[error("decoding this {format} image would exceed the memory limit: {detail}")]
    DecoderLimit { format: &'static str, detail: String },
    /// The server's configuration, not the request, is wrong (a 500, not a 400); also
    /// checkable at load time with [`PreprocessConfig::validate`].
    #[error("invalid image preprocessing config: {0}")]
    Config(String),
}

/// An accepted image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    WebP,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::WebP => "WebP",
        }
    }

    pub(super) fn to_image(self) -> image::ImageFormat {
        match self {
            Self::Png => image::ImageFormat::Png,
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::WebP => image::ImageFormat::WebP,
        }
    }
}

/// The format from the file's magic bytes (never from a name or MIME type, which clients get
/// wrong). Formats we recognize but do not decode are named in the error.
pub fn detect_format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if starts(b"\x89PNG\r\n\x1a\n") {
        return Ok(ImageFormat::Png);
    }
    if starts(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if starts(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        return Ok(ImageFormat::WebP);
    }
    let brand = if bytes.get(4..8) == Some(b"ftyp") { bytes.get(8..12) } else { None };
    let refused = if starts(b"GIF87a") || starts(b"GIF89a") {
        "GIF"
    } else if starts(b"BM") && bytes.get(6..10) == Some(&[0; 4]) {
        "BMP"
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        "TIFF"
    } else if matches!(brand, Some(b"avif" | b"avis")) {
        "AVIF"
    } else if matches!(brand, Some(b"heic" | b"heix" | b"hevc" | b"heim" | b"heis" | b"mif1" | b"msf1")) {
        "HEIC/HEIF"
    } else if starts(&[0xFF, 0x0A]) || starts(b"\0\0\0\x0cJXL \r\n\x87\n") {
        "JPEG XL"
    } else if starts(&[0, 0, 1, 0]) {
        "ICO"
    } else if starts(b"8BPS") {
        "PSD"
    } else if starts(b"qoif") {
        "QOI"
    } else if starts(b"%PDF") {
        "PDF"
    } else if bytes.trim_ascii_start().starts_with(b"<") {
        "text markup (SVG, HTML or XML)"
    } else {
        let start: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(ImageError::UnknownFormat { start: format!("bytes {}", start.join(" ")) });
    };
    Err(ImageError::UnsupportedFormat { format: refused })
}

/// Qwen2-VL's target size for an image of `height × width`: both sides multiples of `factor`,
/// the pixel count within `[min_pixels, max_pixels]` where the aspect ratio allows, the aspect
/// ratio kept as well as rounding allows. Returns `(height, width)`.
///
/// transformers 4.46.3's `smart_resize`, with Python's arithmetic (f64, `round` to even):
/// sides are rounded to the nearest multiple; above `max_pixels` both are scaled by
/// `sqrt(h·w / max_pixels)` and floored, below `min_pixels` scaled up and ceiled. Refused, as
/// there: a side below `factor` (qwen-vl-utils instead clamps to `factor`; older transformers
/// refused below 10), a side ratio above 200. Also refused: a floor that reaches 0 (only
/// for ratios near 200 with a small `max_pixels`), where transformers fails inside Pillow.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    if height < factor || width < factor {
        return Err(ImageError::TooSmall { width, height, min: factor });
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageError::AspectRatio { width, height, ratio });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    // Products in u128: Python's integers do not overflow.
    let area = |a: usize, b: usize| a as u128 * b as u128;
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if area(h_bar, w_bar) > max_pixels as u128 {
        let beta = (area(height, width) as f64 / max_pixels as f64).sqrt();
        h_bar = (h / beta / f).floor() as usize * factor;
        w_bar = (w / beta / f).floor() as usize * factor;
    } else if area(h_bar, w_bar) < min_pixels as u128 {
        let beta = (min_pixels as f64 / area(height, width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(ImageError::CannotFit { width, height, max_pixels, factor });
    }
    Ok((h_bar, w_bar))
}

/// Turns image bytes (PNG, JPEG or WebP) into the vision tower's input.
///
/// `pixel_values` row `r` is the patch at patch-grid position `(2·bh + mh, 2·bw + mw)` where
/// `r = ((bh·(gw/2) + bw)·2 + mh)·2 + mw` (2 = merge_size): the four patches of each 2×2 merge
/// block are consecutive, blocks in raster order. Within a row, column
/// `((c·T + t)·14 + py)·14 + px` holds channel `c` of pixel `(py, px)` of the patch in frame
/// `t` (T = temporal_patch_size; a still image repeats its one frame).
pub fn preprocess(bytes: &[u8], cfg: &PreprocessConfig) -> Result<ImageInput, ImageError> {
    probe(bytes, cfg)?.decode()
}

/// An image whose header has been read and checked against the limits: its hash and patch grid
/// are known, its pixels not decoded yet. A model that still has the image's tower output cached
/// needs nothing more ([`Probed::cached`]); otherwise [`Probed::decode`] finishes the work.
pub struct Probed<'a> {
    source: Source<'a>,
    orientation: Orientation,
    /// Size after orientation, and the resized size.
    size: (usize, usize),
    out: (usize, usize),
    hash: [u8; 32],
    cfg: &'a PreprocessConfig,
}

/// The first half of [`preprocess`]: format, completeness (JPEG), SHA-256, header, size limits,
/// orientation and the resized size — every refusal that does not need the pixels.
pub fn probe<'a>(bytes: &'a [u8], cfg: &'a PreprocessConfig) -> Result<Probed<'a>, ImageError> {
    cfg.validate()?;
    if bytes.len() > cfg.max_file_bytes {
        return Err(ImageError::FileTooLarge { size: bytes.len(), limit: cfg.max_file_bytes });
    }
    let format = detect_format(bytes)?;
    let name = format.name();
    if format == ImageFormat::Jpeg {
        // libjpeg fills a cut-off image with gray and succeeds (with a warning); Pillow refuses it.
        check_jpeg_complete(bytes)?;
    }
    let hash: [u8; 32] = Sha256::digest(bytes).into();

    // Header only: size and orientation, then the limits, then the pixels.
    let source = Source::open(bytes, format, cfg)?;
    let (width, height) = source.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { format: name, width, height });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > cfg.max_source_pixels {
        return Err(ImageError::TooManyPixels { width, height, pixels, limit: cfg.max_source_pixels });
    }
    let orientation = source.orientation();
    let (width, height) = (width as usize, height as usize);
    let (width, height) = match orientation {
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH => {
            (height, width)
        }
        _ => (width, height),
    };
    let (out_h, out_w) = smart_resize(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    Ok(Probed { source, orientation, size: (width, height), out: (out_w, out_h), hash, cfg })
}

impl Probed<'_> {
    /// SHA-256 of the file.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The patch grid `(1, h, w)` the image will have.
    pub fn grid_thw(&self) -> [usize; 3] {
        let (out_w, out_h) = self.out;
        [1, out_h / self.cfg.patch_size, out_w / self.cfg.patch_size]
    }

    /// Decodes, orients, resizes and lays out the pixels: the rest of [`preprocess`].
    pub fn decode(self) -> Result<ImageInput, ImageError> {
        let ((width, height), (out_w, out_h), cfg) = (self.size, self.out, self.cfg);
        let grid_thw = self.grid_thw();
        let mut image = DynamicImage::ImageRgb8(self.source.decode_rgb8()?);
        image.apply_orientation(self.orientation);
        let rgb = image.into_rgb8();
        debug_assert_eq!((rgb.width() as usize, rgb.height() as usize), (width, height));
        let resized = resize_bicubic_rgb8(rgb.as_raw(), width, height, out_w, out_h);
        drop(rgb);
        let pixel_values = patchify(&resized, out_h, out_w, cfg);
        Ok(ImageInput { pixel_values, grid_thw, merge_size: cfg.merge_size, hash: self.hash, embeds: None })
    }

    /// The image as the tower already encoded it (`embeds`, this image's rows from the model's
    /// cache, for the same hash and grid): no pixels are decoded.
    pub fn cached(self, embeds: Arc<[f32]>) -> ImageInput {
        let grid_thw = self.grid_thw();
        ImageInput {
            pixel_values: Vec::new(),
            grid_thw,
            merge_size: self.cfg.merge_size,
            hash: self.hash,
            embeds: Some(embeds),
        }
    }
}

/// Normalizes an RGB8 image of `height × width` (multiples of patch_size·merge_size) and lays
/// it out as `pixel_values` rows (see [`preprocess`]).
fn patchify(rgb: &[u8], height: usize, width: usize, cfg: &PreprocessConfig) -> Vec<f32> {
    let (p, m, frames) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (height / p, width / p);
    debug_assert!(gh % m == 0 && gw % m == 0);
    // Every channel value maps to one float: transformers rescales in f64 (uint8 · (1/255)),
    // casts to f32, then subtracts and divides in f32.
    let mut table = [[0f32; 256]; 3];
    for (c, t) in table.iter_mut().enumerate() {
        for (v, out) in t.iter_mut().enumerate() {
            let x = (v as f64 * (1.0 / 255.0)) as f32;
            *out = (x - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32;
        }
    }
    let row_len = cfg.row_len();
    let frame_len = p * p;
    let mut out = vec![0f32; gh * gw * row_len];
    let mut rows = out.chunks_exact_mut(row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let row = rows.next().expect("one row per patch");
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, t) in table.iter().enumerate() {
                        let plane = &mut row[c * frames * frame_len..(c + 1) * frames * frame_len];
                        let (first, rest) = plane.split_at_mut(frame_len);
                        for (py, line) in first.chunks_exact_mut(p).enumerate() {
                            let src = &rgb[3 * ((y0 + py) * width + x0)..3 * ((y0 + py) * width + x0 + p)];
                            for (o, px) in line.iter_mut().zip(src.chunks_exact(3)) {
                                *o = t[px[c] as usize];
                            }
                        }
                        for frame in rest.chunks_exact_mut(frame_len) {
                            frame.copy_from_slice(first);
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sr(h: usize, w: usize, max: usize) -> (usize, usize) {
        smart_resize(h, w, 28, 56 * 56, max).unwrap()
    }

    #[test]
    fn smart_resize_worked_examples() {
        // docs: model-formats.md §3.2; checked against transformers 4.46.3.
        assert_eq!(sr(1080, 1920, 12_845_056), (1092, 1932));
        assert_eq!(sr(1080, 1920, 1_003_520), (728, 1316));
        assert_eq!(sr(480, 640, 12_845_056), (476, 644));
        assert_eq!(sr(224, 224, 12_845_056), (224, 224));
        // 70 / 28 = 2.5 rounds to even: 2 -> 56.
        assert_eq!(sr(70, 70, 12_845_056), (56, 56));
        // 42/28 = 1.5 and 98/28 = 3.5 round to even: 2 and 4.
        assert_eq!(sr(42, 98, 12_845_056), (56, 112));
        // min_pixels branch: 41x29 rounds to 28x28 < 3136, scaled up by sqrt(3136/1189).
        assert_eq!(sr(41, 29, 12_845_056), (84, 56));
        // max_pixels branch of the goldens' 480x640 portrait.
        assert_eq!(sr(640, 480, 256 * 28 * 28), (504, 364));
    }

    #[test]
    fn smart_resize_tokens() {
        let tokens = |h, w, max| {
            let (h, w) = sr(h, w, max);
            (h / 14) * (w / 14) / 4
        };
        assert_eq!(tokens(1080, 1920, 12_845_056), 2691);
        assert_eq!(tokens(1080, 1920, 1_003_520), 1222);
        assert_eq!(tokens(480, 640, 12_845_056), 391);
        assert_eq!(tokens(224, 224, 12_845_056), 64);
        assert_eq!(tokens(70, 70, 12_845_056), 4);
        assert_eq!(tokens(42, 98, 12_845_056), 8);
    }

    #[test]
    fn smart_resize_refusals() {
        assert!(matches!(smart_resize(27, 500, 28, 3136, 1 << 24), Err(ImageError::TooSmall { height: 27, .. })));
        assert!(matches!(smart_resize(500, 10, 28, 3136, 1 << 24), Err(ImageError::TooSmall { width: 10, .. })));
        // 28 x 5601: ratio 200.04.
        let e = smart_resize(28, 5601, 28, 3136, 1 << 24).unwrap_err();
        assert!(matches!(e, ImageError::AspectRatio { .. }), "{e}");
        assert!(e.to_string().contains("200.0"), "{e}");
        // Ratio exactly 200 is allowed.
        assert_eq!(smart_resize(28, 5600, 28, 3136, 1 << 24).unwrap(), (28, 5600));
        // ... but cannot be fitted into 100000 pixels with a side of at least 28.
        assert!(matches!(smart_resize(28, 5600, 28, 3136, 100_000), Err(ImageError::CannotFit { .. })));
    }

    fn cfg() -> PreprocessConfig {
        PreprocessConfig::default()
    }

    /// transformers' rescale + normalize for one value: `np.float32(v * (1/255))`, minus and
    /// divided by the float32 mean and std.
    fn hf_normalize(v: u8, ch: usize, c: &PreprocessConfig) -> f32 {
        ((f64::from(v) * (1.0 / 255.0)) as f32 - c.image_mean[ch] as f32) / c.image_std[ch] as f32
    }

    #[test]
    fn config_defaults() {
        let c = cfg();
        assert_eq!((c.factor(), c.row_len()), (28, 1176));
        assert_eq!(c.max_pixels, 16384 * 28 * 28);
    }

    /// transformers' reshape/transpose written out index by index, against `patchify`.
    #[test]
    fn flatten_order_matches_the_transformers_permutation() {
        let c = cfg();
        let (h, w) = (56, 84); // grid 4 x 6 patches, 2 x 3 merge blocks
        let rgb: Vec<u8> = (0..h * w * 3).map(|i| (i * 31 % 251) as u8).collect();
        let out = patchify(&rgb, h, w, &c);
        let (gh, gw) = (h / 14, w / 14);
        assert_eq!(out.len(), gh * gw * 1176);
        let norm = |v: u8, ch: usize| hf_normalize(v, ch, &c);
        // patches.reshape(gt, T, C, gh/2, 2, 14, gw/2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8):
        // output axes (gt, bh, bw, mh, mw, C, T, ph, pw), flattened to rows of C*T*14*14.
        let mut idx = 0;
        for bh in 0..gh / 2 {
            for bw in 0..gw / 2 {
                for mh in 0..2 {
                    for mw in 0..2 {
                        for ch in 0..3 {
                            for _t in 0..2 {
                                for ph in 0..14 {
                                    for pw in 0..14 {
                                        let (y, x) = ((2 * bh + mh) * 14 + ph, (2 * bw + mw) * 14 + pw);
                                        assert_eq!(out[idx], norm(rgb[3 * (y * w + x) + ch], ch), "index {idx}");
                                        idx += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // The documented formula for one element: row 5 = block (0, 1), (mh, mw) = (0, 1).
        let (r, ch, t, ph, pw) = (5, 2, 1, 3, 9);
        let (y, x) = (3, (2 + 1) * 14 + 9);
        assert_eq!(out[r * 1176 + ((ch * 2 + t) * 14 + ph) * 14 + pw], norm(rgb[3 * (y * w + x) + ch], ch));
    }

    #[test]
    fn normalization_matches_numpy_float32() {
        // transformers: (np.float32(v * (1/255)) - np.float32(mean)) / np.float32(std), values
        // run with numpy 2.4 (transformers.image_transforms.rescale + normalize), as bits.
        let out = patchify(&[0u8, 128, 255].repeat(28 * 28), 28, 28, &cfg());
        assert_eq!(out[0].to_bits(), NUMPY_R0);
        assert_eq!(out[2 * 196].to_bits(), NUMPY_G128);
        assert_eq!(out[4 * 196].to_bits(), NUMPY_B255);
    }
    // -1.7922626, 0.16889732, 2.145897
    const NUMPY_R0: u32 = 0xbfe5_68dc;
    const NUMPY_G128: u32 = 0x3e2c_f36b;
    const NUMPY_B255: u32 = 0x4009_5660;

    // --- Whole-pipeline cases on files built here. ---

    /// A PNG file with the given IHDR fields and (zlib-compressed) raw scanlines.
    fn png(width: u32, height: u32, bit_depth: u8, color_type: u8, idat: &[u8]) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&crc32(&[kind.as_slice(), data].concat()).to_be_bytes());
        }
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", idat);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// zlib "stored" (uncompressed) blocks around `raw`.
    fn zlib_stored(raw: &[u8]) -> Vec<u8> {
        let mut out = vec![0x78, 0x01];
        let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
        for (i, c) in chunks.iter().enumerate() {
            out.push(u8::from(i + 1 == chunks.len()));
            out.extend_from_slice(&(c.len() as u16).to_le_bytes());
            out.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
            out.extend_from_slice(c);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &x in raw {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        out.extend_from_slice(&((b << 16) | a).to_be_bytes());
        out
    }

    /// An 8-bit RGB PNG whose pixel (x, y) is `f(x, y)`.
    fn rgb_png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let mut raw = Vec::new();
        for y in 0..h {
            raw.push(0); // filter: none
            for x in 0..w {
                raw.extend_from_slice(&f(x, y));
            }
        }
        png(w, h, 8, 2, &zlib_stored(&raw))
    }

    #[test]
    fn a_png_flat_color_gives_its_normalized_value_everywhere() {
        let data = rgb_png(120, 60, |_, _| [255, 0, 128]);
        let img = preprocess(&data, &cfg()).unwrap();
        // 60x120 rounds to 56x112: grid (1, 4, 8), 32 rows, 8 LLM tokens.
        assert_eq!(img.grid_thw, [1, 4, 8]);
        assert_eq!((img.rows(), img.row_len(), img.llm_tokens()), (32, 1176, 8));
        let c = cfg();
        let norm = |v: u8, ch: usize| hf_normalize(v, ch, &c);
        for row in img.pixel_values.chunks_exact(1176) {
            assert!(row[..392].iter().all(|&v| v == norm(255, 0)));
            assert!(row[392..784].iter().all(|&v| v == norm(0, 1)));
            assert!(row[784..].iter().all(|&v| v == norm(128, 2)));
        }
        assert_eq!(img.hash, <[u8; 32]>::from(Sha256::digest(&data)));
    }

    /// `probe` gives the hash and grid `preprocess` gives, from the header alone: a file whose
    /// pixel data is garbage probes fine (and only fails to decode).
    #[test]
    fn probing_reads_hash_and_grid_from_the_header_alone() {
        let data = rgb_png(120, 60, |x, y| [x as u8, y as u8, 9]);
        let full = preprocess(&data, &cfg()).unwrap();
        let c = cfg();
        let p = probe(&data, &c).unwrap();
        assert_eq!((p.hash(), p.grid_thw()), (full.hash, full.grid_thw));
        assert_eq!(p.decode().unwrap(), full);
        let garbage = png(120, 60, 8, 2, &[1, 2, 3]);
        let p = probe(&garbage, &c).unwrap();
        assert_eq!(p.grid_thw(), [1, 4, 8]);
        assert!(p.decode().is_err());
        let cached = probe(&data, &c).unwrap().cached(vec![0.5; 8 * 4].into());
        assert_eq!((cached.hash, cached.grid_thw, cached.llm_tokens()), (full.hash, full.grid_thw, 8));
        assert!(cached.pixel_values.is_empty() && cached.embeds.is_some());
    }

    #[test]
    fn truncated_and_broken_png_are_refused() {
        let data = rgb_png(64, 64, |x, y| [x as u8, y as u8, 7]);
        assert!(preprocess(&data, &cfg()).is_ok());
        for cut in [20, 40, data.len() / 2, data.len() - 13] {
            let e = preprocess(&data[..cut], &cfg()).unwrap_err();
            assert!(matches!(e, ImageError::Truncated { .. } | ImageError::Corrupt { .. }), "cut at {cut}: {e:?}");
        }
        // Flip a byte of the pixel data: the CRC (or zlib's checksum) no longer matches.
        let mut bad = data.clone();
        bad[100] ^= 0x55;
        let e = preprocess(&bad, &cfg()).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { format: "PNG", .. }), "{e:?}");
        // Not even a header.
        let e = preprocess(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHD", &cfg()).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. } | ImageError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn zero_size_png_is_refused() {
        let e = preprocess(&png(0, 0, 8, 2, &zlib_stored(&[])), &cfg()).unwrap_err();
        // The png crate refuses a 0 side while reading IHDR; either way it never decodes.
        assert!(matches!(e, ImageError::ZeroSize { .. } | ImageError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("PNG"), "{e}");
    }

    #[test]
    fn a_huge_header_is_refused_before_decoding() {
        // 30000 x 30000 claimed by a 100-byte file: refused from the header, before any
        // allocation for pixels (2.7 GB of RGB).
        let data = png(30_000, 30_000, 8, 2, &zlib_stored(&[0; 16]));
        assert!(data.len() < 120);
        let e = preprocess(&data, &cfg()).unwrap_err();
        match e {
            ImageError::TooManyPixels { width: 30_000, height: 30_000, pixels: 900_000_000, limit: 50_000_000 } => {}
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("30000x30000") && msg.contains("50000000"), "{msg}");
    }

    #[test]
    fn file_size_limit() {
        let data = rgb_png(64, 64, |_, _| [1, 2, 3]);
        let c = PreprocessConfig { max_file_bytes: 1000, ..cfg() };
        let e = preprocess(&data, &c).unwrap_err();
        assert!(matches!(e, ImageError::FileTooLarge { limit: 1000, .. }), "{e:?}");
        assert!(e.to_string().contains(&data.len().to_string()));
    }

    #[test]
    fn small_and_elongated_images_are_refused_before_decoding() {
        // The pixel data here is garbage: the size checks must come first.
        let e = preprocess(&png(20, 300, 8, 2, &[1, 2, 3]), &cfg()).unwrap_err();
        assert!(matches!(e, ImageError::TooSmall { width: 20, height: 300, min: 28 }), "{e:?}");
        let e = preprocess(&png(10_000, 30, 8, 2, &[1, 2, 3]), &cfg()).unwrap_err();
        assert!(matches!(e, ImageError::AspectRatio { .. }), "{e:?}");
    }

    #[test]
    fn other_formats_are_named() {
        let cases: [(&[u8], &str); 6] = [
            (b"GIF89a\x01\0\x01\0\0\0\0;", "GIF"),
            (b"GIF87a\x01\0\x01\0", "GIF"),
            (b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0", "BMP"),
            (b"II*\0\x08\0\0\0", "TIFF"),
            (b"\0\0\0\x1cftypavif\0\0\0\0", "AVIF"),
            (b"\0\0\0\x18ftypheic\0\0\0\0", "HEIC/HEIF"),
        ];
        for (data, name) in cases {
            let e = preprocess(data, &cfg()).unwrap_err();
            assert!(matches!(e, ImageError::UnsupportedFormat { format } if format == name), "{name}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(name) && msg.contains("PNG, JPEG, WebP"), "{msg}");
        }
        let e = preprocess(b"hello world", &cfg()).unwrap_err();
        assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
        assert!(e.to_string().contains("68 65 6c 6c 6f"), "{e}");
        assert!(matches!(preprocess(b"", &cfg()), Err(ImageError::Empty)));
        // A RIFF that is not WebP (a WAV file).
        assert!(matches!(preprocess(b"RIFF\x24\0\0\0WAVEfmt ", &cfg()), Err(ImageError::UnknownFormat { .. })));
    }

    #[test]
    fn sixteen_bit_png_keeps_the_high_byte() {
        // 28x28 RGB, 16-bit: every sample 0x80FF -> 0x80 (Pillow), not round(0x80FF / 257) = 0x81.
        let line: Vec<u8> = std::iter::once(0).chain([0x80, 0xFF].repeat(28 * 3)).collect();
        let raw = line.repeat(28);
        let c = PreprocessConfig { min_pixels: 0, ..cfg() };
        let img = preprocess(&png(28, 28, 16, 2, &zlib_stored(&raw)), &c).unwrap();
        let expect = hf_normalize(128, 0, &c);
        assert_eq!(img.pixel_values[0], expect);
    }
}
