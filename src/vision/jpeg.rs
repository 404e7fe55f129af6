//! JPEG decoding with libjpeg-turbo's decoder (vendored by the `mozjpeg` crate, whose decoder is
//! libjpeg-turbo's), set up as Pillow sets it up, so that a JPEG gives the same bytes as
//! `Image.open(f).convert("RGB")` — the way transformers loads an image. The IDCT (JDCT_ISLOW),
//! the chroma upsampling ("fancy", triangular) and the YCbCr→RGB rounding are libjpeg-turbo's
//! defaults, which Pillow keeps outside draft mode; its SIMD paths are exact to its C ones.
//!
//! Layers as Pillow maps them: 1 → gray, replicated to RGB; 3 → RGB (libjpeg converts from
//! YCbCr unless the file says RGB); 4 → CMYK, read as Adobe-inverted ("CMYK;I", which Pillow
//! always assumes) and converted with Pillow's `cmyk2rgb`. Other layer counts and 12-bit
//! samples are refused, as by Pillow.
//!
//! libjpeg reports a fatal error by unwinding (the crate's error manager); every call here
//! runs inside `catch_unwind`, and the message becomes [`ImageError::Corrupt`]. A file cut
//! short is not an error to libjpeg (it warns and fills with gray), so callers check
//! completeness first (`check_jpeg_complete` in the preprocessor), as Pillow refuses
//! truncated files.

use std::panic::{catch_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress, Marker};

use super::ImageError;

const FORMAT: &str = "JPEG";

/// A JPEG whose header has been read: its size and EXIF orientation, before any pixel is decoded.
pub struct Jpeg<'a> {
    bytes: &'a [u8],
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    layers: usize,
}

/// Runs `f` (libjpeg calls) and turns an unwound libjpeg error into [`ImageError::Corrupt`].
fn guarded<T>(f: impl FnOnce() -> std::io::Result<T>) -> Result<T, ImageError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ImageError::Corrupt { format: FORMAT, detail: e.to_string() }),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            let detail = detail.strip_prefix("libjpeg fatal error: ").unwrap_or(detail);
            Err(ImageError::Corrupt { format: FORMAT, detail: detail.to_string() })
        }
    }
}

impl<'a> Jpeg<'a> {
    /// Reads the header (and the APP1 segments, for EXIF).
    pub fn open(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let (width, height, orientation, layers) = guarded(|| {
            let d = Decompress::builder().with_markers(&[Marker::APP(1)]).from_mem(bytes)?;
            let (width, height) = d.size();
            // Pillow takes the first APP1 that starts with "Exif\0\0".
            let orientation = d
                .markers()
                .filter(|m| matches!(m.marker, Marker::APP(1)))
                .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
                .and_then(Orientation::from_exif_chunk)
                .unwrap_or(Orientation::NoTransforms);
            Ok((width, height, orientation, d.components().len()))
        })?;
        if !matches!(layers, 1 | 3 | 4) {
            return Err(ImageError::UnsupportedFeature {
                format: FORMAT,
                detail: format!("{layers} colour components (1, 3 or 4 are supported)"),
            });
        }
        let (width, height) = (u32::try_from(width).unwrap_or(u32::MAX), u32::try_from(height).unwrap_or(u32::MAX));
        Ok(Self { bytes, width, height, orientation, layers })
    }

    /// The pixels as RGB, as Pillow's `convert("RGB")` gives them (not yet oriented).
    pub fn decode_rgb(&self) -> Result<RgbImage, ImageError> {
        let bytes = self.bytes;
        let layers = self.layers;
        let data = guarded(|| {
            let d = Decompress::new_mem(bytes)?;
            let mut started = match layers {
                1 => d.grayscale()?,
                3 => d.rgb()?,
                _ => d.to_colorspace(ColorSpace::JCS_CMYK)?,
            };
            let data: Vec<u8> = started.read_scanlines()?;
            started.finish()?;
            Ok(data)
        })?;
        let pixels = self.width as usize * self.height as usize;
        if data.len() != pixels * layers {
            return Err(ImageError::Corrupt {
                format: FORMAT,
                detail: format!("decoded {} bytes for {}×{}×{layers}", data.len(), self.width, self.height),
            });
        }
        let rgb = match layers {
            1 => data.iter().flat_map(|&l| [l, l, l]).collect(),
            3 => data,
            _ => data.chunks_exact(4).flat_map(cmyk_inverted_to_rgb).collect(),
        };
        Ok(RgbImage::from_raw(self.width, self.height, rgb).expect("3 bytes per pixel"))
    }
}

/// One Adobe-inverted CMYK pixel as Pillow converts it: "CMYK;I" unpacking (255 − v), then
/// `cmyk2rgb`: each channel `clip(nk − nk·v/255)` with `nk = 255 − k`, its ÷255 rounded as
/// Pillow's `MULDIV255`.
fn cmyk_inverted_to_rgb(p: &[u8]) -> [u8; 3] {
    fn muldiv255(a: u32, b: u32) -> u32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let nk = u32::from(p[3]); // 255 − (255 − raw k)
    let channel = |raw: u8| {
        let v = 255 - u32::from(raw);
        (nk - muldiv255(v, nk)) as u8
    };
    [channel(p[0]), channel(p[1]), channel(p[2])]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_matches_pillow() {
        // Pillow 11.0.0: Image.fromarray(cmyk, "CMYK").convert("RGB"), with cmyk the inverted
        // raw values below ("CMYK;I" stores 255 − v).
        let cases: [([u8; 4], [u8; 3]); 5] = [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([255, 0, 0, 0], [0, 255, 255]),
            ([100, 50, 200, 30], [137, 181, 49]),
            ([10, 20, 30, 255], [0, 0, 0]),
            ([200, 200, 200, 200], [12, 12, 12]),
        ];
        for (cmyk, want) in cases {
            let raw = cmyk.map(|v| 255 - v);
            assert_eq!(cmyk_inverted_to_rgb(&raw), want, "{cmyk:?}");
        }
    }

    #[test]
    fn garbage_after_the_marker_is_an_error_not_a_panic() {
        let e = Jpeg::open(&[0xFF, 0xD8, 0xFF, 0xC0, 0, 3, 1, 2, 3]).err().expect("refused");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
        let e = Jpeg::open(&[0xFF, 0xD8, 0x00, 0x11, 0x22]).err().expect("refused");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
    }
}
