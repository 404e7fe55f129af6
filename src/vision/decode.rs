//! Image bytes → RGB8 as Pillow's `Image.open(f).convert("RGB")` gives them, with the facts the
//! preprocessor needs before any pixel is decoded (size, orientation): JPEG through
//! libjpeg-turbo (`super::jpeg`), PNG and WebP through the `image` crate; and the completeness
//! check that makes a cut-off JPEG an error, as in Pillow.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::jpeg::Jpeg;
use super::{ImageError, ImageFormat, PreprocessConfig};

/// An image whose header has been read: JPEG by libjpeg-turbo (as Pillow decodes it), PNG and
/// WebP by the `image` crate.
pub(super) enum Source<'a> {
    Jpeg(Jpeg<'a>),
    Other { decoder: Box<dyn ImageDecoder + 'a>, format: ImageFormat, orientation: Orientation },
}

impl<'a> Source<'a> {
    pub(super) fn open(bytes: &'a [u8], format: ImageFormat, cfg: &PreprocessConfig) -> Result<Self, ImageError> {
        if format == ImageFormat::Jpeg {
            return Jpeg::open(bytes).map(Source::Jpeg);
        }
        let mut limits = Limits::default();
        // Our pixel check is the real bound; this caps the decoders' own allocations (8 bytes
        // per pixel covers 16-bit RGBA; 16 MiB for metadata chunks).
        limits.max_alloc = Some(cfg.max_source_pixels.saturating_mul(8).saturating_add(16 << 20));
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image());
        reader.limits(limits);
        let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
        let orientation = orientation(&mut decoder, format);
        Ok(Source::Other { decoder: Box::new(decoder), format, orientation })
    }

    pub(super) fn dimensions(&self) -> (u32, u32) {
        match self {
            Source::Jpeg(j) => (j.width, j.height),
            Source::Other { decoder, .. } => decoder.dimensions(),
        }
    }

    pub(super) fn orientation(&self) -> Orientation {
        match self {
            Source::Jpeg(j) => j.orientation,
            Source::Other { orientation, .. } => *orientation,
        }
    }

    /// The pixels as Pillow's `convert("RGB")` makes them, not yet oriented.
    pub(super) fn decode_rgb8(self) -> Result<RgbImage, ImageError> {
        match self {
            Source::Jpeg(j) => j.decode_rgb(),
            Source::Other { decoder, format, .. } => {
                DynamicImage::from_decoder(decoder).map(to_rgb8).map_err(|e| decode_error(format, e))
            }
        }
    }
}

/// The orientation Pillow's `exif_transpose` applies: EXIF's tag, else for a PNG the
/// `tiff:Orientation` of its XMP packet (Pillow 11's `getexif` falls back to the PNG
/// "XML:com.adobe.xmp" text only; Pillow 13 reads JPEG and WebP XMP too). Unreadable metadata
/// means none.
fn orientation(decoder: &mut impl ImageDecoder, format: ImageFormat) -> Orientation {
    if let Ok(Some(exif)) = decoder.exif_metadata() {
        if let Some(o) = Orientation::from_exif_chunk(&exif) {
            return o;
        }
    }
    if format != ImageFormat::Png {
        return Orientation::NoTransforms;
    }
    match decoder.xmp_metadata() {
        Ok(Some(xmp)) => xmp_orientation(&xmp).unwrap_or(Orientation::NoTransforms),
        _ => Orientation::NoTransforms,
    }
}

/// The first `tiff:Orientation="N"` or `tiff:Orientation>N` in an XMP packet (Pillow's
/// pattern); values outside 1..=8 mean none.
pub(super) fn xmp_orientation(xmp: &[u8]) -> Option<Orientation> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut at = 0;
    while let Some(i) = xmp[at..].windows(KEY.len()).position(|w| w == KEY) {
        let rest = &xmp[at + i + KEY.len()..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(d - b'0'),
            _ => None,
        };
        if let Some(d) = digit {
            return Orientation::from_exif(d);
        }
        at += i + 1;
    }
    None
}

/// RGB8 as Pillow's `convert("RGB")` makes it from each decoded layout.
fn to_rgb8(image: DynamicImage) -> RgbImage {
    fn build(w: u32, h: u32, data: Vec<u8>) -> RgbImage {
        RgbImage::from_raw(w, h, data).expect("3 bytes per pixel")
    }
    let (w, h) = (image.width(), image.height());
    match image {
        DynamicImage::ImageRgb8(img) => img,
        DynamicImage::ImageRgba8(img) => {
            build(w, h, img.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect())
        }
        DynamicImage::ImageLuma8(img) => build(w, h, img.as_raw().iter().flat_map(|&l| [l, l, l]).collect()),
        DynamicImage::ImageLumaA8(img) => {
            build(w, h, img.as_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect())
        }
        // Pillow reads 16-bit PNG samples as their high byte.
        DynamicImage::ImageRgb16(img) => build(w, h, img.as_raw().iter().map(|&v| (v >> 8) as u8).collect()),
        DynamicImage::ImageRgba16(img) => build(
            w,
            h,
            img.as_raw()
                .chunks_exact(4)
                .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
                .collect(),
        ),
        DynamicImage::ImageLuma16(img) => build(w, h, img.as_raw().iter().flat_map(|&l| [(l >> 8) as u8; 3]).collect()),
        DynamicImage::ImageLumaA16(img) => {
            build(w, h, img.as_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect())
        }
        // Float layouts: no PNG/JPEG/WebP decoder produces them.
        other => other.to_rgb8(),
    }
}

/// Maps the `image` crate's error to ours.
fn decode_error(format: ImageFormat, e: image::ImageError) -> ImageError {
    use image::ImageError as E;
    let format = format.name();
    match e {
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => ImageError::Truncated { format },
        E::Limits(l) => ImageError::DecoderLimit { format, detail: l.to_string() },
        E::Unsupported(u) => ImageError::UnsupportedFeature { format, detail: u.to_string() },
        other => ImageError::Corrupt { format, detail: other.to_string() },
    }
}

/// Walks a JPEG's marker segments and entropy-coded scans to its end-of-image marker: a file
/// cut anywhere before it is [`ImageError::Truncated`]. Garbage after the end is allowed (some
/// cameras append data), as by libjpeg.
pub(super) fn check_jpeg_complete(bytes: &[u8]) -> Result<(), ImageError> {
    const TRUNCATED: ImageError = ImageError::Truncated { format: "JPEG" };
    let mut pos = 2; // after SOI
    loop {
        // Next marker: 0xFF (possibly several: fill bytes), then the code.
        let ff = bytes[pos..].iter().position(|&b| b == 0xFF).ok_or(TRUNCATED)?;
        pos += ff;
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let code = *bytes.get(pos).ok_or(TRUNCATED)?;
        pos += 1;
        match code {
            0xD9 => return Ok(()),
            // Standalone markers: no length.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let len = bytes.get(pos..pos + 2).ok_or(TRUNCATED)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 {
            return Err(ImageError::Corrupt {
                format: "JPEG",
                detail: format!("marker 0xFF{code:02X} has length {len}"),
            });
        }
        pos += len;
        if pos > bytes.len() {
            return Err(TRUNCATED);
        }
        if code == 0xDA {
            // Entropy-coded data follows the scan header: it ends at the first 0xFF that is
            // neither a stuffed 0x00 nor a restart marker.
            loop {
                let ff = bytes[pos..].iter().position(|&b| b == 0xFF).ok_or(TRUNCATED)?;
                pos += ff;
                match bytes.get(pos + 1) {
                    None => return Err(TRUNCATED),
                    Some(0x00 | 0xD0..=0xD7) => pos += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_walk() {
        // SOI, APP0 (length 4), SOS with a 2-byte header... a minimal marker skeleton.
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2];
        j.extend_from_slice(&[0xFF, 0xDA, 0, 2]);
        // Entropy-coded data with a stuffed 0xFF00 and a restart marker.
        j.extend_from_slice(&[1, 2, 0xFF, 0x00, 3, 0xFF, 0xD3, 4]);
        assert!(matches!(check_jpeg_complete(&j), Err(ImageError::Truncated { .. })));
        let mut done = j.clone();
        done.extend_from_slice(&[0xFF, 0xD9, 0xAB]);
        check_jpeg_complete(&done).unwrap();
        // An APP segment cut short.
        assert!(matches!(
            check_jpeg_complete(&[0xFF, 0xD8, 0xFF, 0xE1, 0x10, 0, 1]),
            Err(ImageError::Truncated { .. })
        ));
        // A second scan (progressive) after a DHT.
        let mut prog = j.clone();
        prog.extend_from_slice(&[0xFF, 0xC4, 0, 3, 0xFF, 0xFF, 0xDA, 0, 2, 9, 9, 0xFF, 0xD9]);
        check_jpeg_complete(&prog).unwrap();
    }

    #[test]
    fn xmp_orientation_pattern() {
        assert_eq!(xmp_orientation(b"<x tiff:Orientation=\"6\"/>"), Some(Orientation::Rotate90));
        assert_eq!(xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"), Some(Orientation::Rotate180));
        assert_eq!(xmp_orientation(b"tiff:Orientation='6' tiff:Orientation=\"8\""), Some(Orientation::Rotate270));
        assert_eq!(xmp_orientation(b"tiff:Orientation=\"9\""), None);
        assert_eq!(xmp_orientation(b"nothing"), None);
    }
}
