//! A generation's input image (image-to-image, inpainting, edits): read from the request's base64 or from
//! an earlier generation's PNG, checked before anything is queued, and fitted to the generation's size.

use std::io::Cursor;

use app::{limits, GenerateRequest, JobKind, JobStatus};
use base64::Engine as _;
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};

use crate::error::ApiError;
use crate::files::JobId;
use crate::jobs::capability::PlanInput;
use crate::jobs::Jobs;
use crate::store::Viewer;

/// The decoded input image and mask, at their own size, with where they came from.
pub struct Decoded {
    pub image: DynamicImage,
    pub mask: Option<DynamicImage>,
    /// `(job_id, index)` for an `image_job`.
    pub job: Option<(String, u32)>,
}

impl Decoded {
    /// The size the generation gets when the request names none ([`limits::size_for_input`]).
    pub fn size(&self, width: Option<u32>, height: Option<u32>) -> (u32, u32) {
        limits::size_for_input((self.image.width(), self.image.height()), width, height)
    }

    /// Scaled to cover `width` x `height` and centre-cropped to it, the mask alike.
    pub fn fit(self, width: u32, height: u32, strength: f32) -> PlanInput {
        PlanInput {
            image: fit(&self.image, width, height).to_rgb8(),
            mask: self
                .mask
                .map(|m| fit(&m, width, height).to_luma8() as GrayImage),
            strength,
            job: self.job,
        }
    }
}

/// Reads the request's input image and mask, if it has one: a 422 for undecodable data, a format other
/// than PNG or JPEG, an image beyond the limits, a mask of another size, or an `image_job` that is not a
/// completed generation of this studio (with that image) that `viewer` may see. Decoding runs on the
/// blocking pool.
pub async fn read(
    jobs: &Jobs,
    request: &GenerateRequest,
    viewer: &Viewer,
) -> Result<Option<Decoded>, ApiError> {
    let image_bytes = match (&request.image, &request.image_job) {
        (Some(data), _) => Some((base64_bytes("image", data)?, None)),
        (None, Some(job)) => {
            Some(job_image(jobs, job, request.image_index.unwrap_or(0), viewer).await?)
        }
        (None, None) => None,
    };
    let Some((bytes, job)) = image_bytes else {
        return Ok(None);
    };
    let mask = request
        .mask
        .as_deref()
        .map(|m| base64_bytes("mask", m))
        .transpose()?;
    tokio::task::spawn_blocking(move || {
        let image = decode("image", &bytes)?;
        let mask = mask.map(|m| decode("mask", &m)).transpose()?;
        if let Some(m) = &mask {
            if (m.width(), m.height()) != (image.width(), image.height()) {
                return Err(ApiError::validation(format!(
                    "mask is {}x{} but the image is {}x{}: give a mask of the image's size",
                    m.width(),
                    m.height(),
                    image.width(),
                    image.height()
                )));
            }
        }
        Ok(Some(Decoded { image, mask, job }))
    })
    .await
    .unwrap_or_else(|err| Err(ApiError::internal("decoding the input image", err)))
}

/// Base64 (or a data URL) of a PNG or JPEG within the limits: its bytes and its pixels.
pub struct Uploaded {
    pub bytes: Vec<u8>,
    pub image: DynamicImage,
}

pub fn decode_base64_image(name: &str, data: &str) -> Result<Uploaded, ApiError> {
    if data.len() > limits::MAX_INPUT_BYTES {
        return Err(ApiError::validation(format!(
            "{name} is larger than {} MiB of base64",
            limits::MAX_INPUT_BYTES >> 20
        )));
    }
    let bytes = base64_bytes(name, data)?;
    let image = decode(name, &bytes)?;
    Ok(Uploaded { bytes, image })
}

/// The PNG of image `index` of a completed generation of this studio that `viewer` may see (another
/// user's is refused as one that does not exist).
async fn job_image(
    jobs: &Jobs,
    job: &str,
    index: u32,
    viewer: &Viewer,
) -> Result<(Vec<u8>, Option<(String, u32)>), ApiError> {
    let not_ours = || {
        ApiError::validation(format!(
            "image_job {job:?} is not a completed generation of this studio with an image {index}: \
             give the job_id of a generation's answer"
        ))
    };
    let id: JobId = job.parse().map_err(|_| not_ours())?;
    let record = jobs.record_for(id, viewer).await.map_err(|_| not_ours())?;
    // Its result is recorded once its images are written, just before it is marked completed: a client
    // that got the answer may use it at once.
    let done = record.status == JobStatus::Completed || record.result.is_some();
    if record.kind != JobKind::Generation || !done {
        return Err(not_ours());
    }
    let path = jobs.data().image_at(id, index);
    jobs.data()
        .fetch_async(&path)
        .await
        .map_err(|e| ApiError::internal("fetching the input image", e))?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| not_ours())?;
    Ok((bytes, Some((id.to_string(), index))))
}

/// Base64, with or without a `data:image/...;base64,` prefix.
fn base64_bytes(name: &str, data: &str) -> Result<Vec<u8>, ApiError> {
    let data = match data.strip_prefix("data:") {
        Some(url) => url
            .split_once(";base64,")
            .map(|(_, payload)| payload)
            .ok_or_else(|| {
                ApiError::validation(format!(
                    "{name} is a data URL without ;base64,: send the image as base64"
                ))
            })?,
        None => data,
    };
    let data = data.trim();
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(data))
        .map_err(|e| ApiError::validation(format!("{name} is not base64: {e}")))
}

/// A PNG or JPEG within the size limits.
fn decode(name: &str, bytes: &[u8]) -> Result<DynamicImage, ApiError> {
    let format = image::guess_format(bytes).ok();
    if !matches!(format, Some(ImageFormat::Png | ImageFormat::Jpeg)) {
        return Err(ApiError::validation(format!(
            "{name} is not a PNG or JPEG image"
        )));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes));
    reader.set_format(format.expect("checked above"));
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(limits::MAX_INPUT_SIDE);
    limits.max_image_height = Some(limits::MAX_INPUT_SIDE);
    reader.limits(limits);
    reader.decode().map_err(|e| {
        let reason = match e {
            image::ImageError::Limits(_) => format!(
                "is larger than {0}x{0} pixels: scale it down",
                limits::MAX_INPUT_SIDE
            ),
            other => format!("cannot be decoded: {other}"),
        };
        ApiError::validation(format!("{name} {reason}"))
    })
}

/// Scales `image` to cover `width` x `height` (keeping its shape) and crops the middle.
pub fn fit(image: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let (w, h) = (image.width(), image.height());
    if (w, h) == (width, height) {
        return image.clone();
    }
    let scale = (f64::from(width) / f64::from(w)).max(f64::from(height) / f64::from(h));
    let (sw, sh) = (
        ((f64::from(w) * scale).round() as u32).max(width),
        ((f64::from(h) * scale).round() as u32).max(height),
    );
    let scaled = image.resize_exact(sw, sh, image::imageops::FilterType::Lanczos3);
    scaled.crop_imm((sw - width) / 2, (sh - height) / 2, width, height)
}

/// For the CLI: a file's image (and mask) fitted as the server fits them.
pub fn from_files(
    image: &std::path::Path,
    mask: Option<&std::path::Path>,
) -> anyhow::Result<Decoded> {
    let read = |name: &str, path: &std::path::Path| -> anyhow::Result<DynamicImage> {
        let bytes =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        decode(name, &bytes).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))
    };
    let decoded = Decoded {
        image: read("image", image)?,
        mask: mask.map(|m| read("mask", m)).transpose()?,
        job: None,
    };
    if let Some(m) = &decoded.mask {
        anyhow::ensure!(
            (m.width(), m.height()) == (decoded.image.width(), decoded.image.height()),
            "the mask is {}x{} but the image is {}x{}: give a mask of the image's size",
            m.width(),
            m.height(),
            decoded.image.width(),
            decoded.image.height()
        );
    }
    Ok(decoded)
}

/// An RGB image as a `DynamicImage`, for tests and the CLI.
pub fn dynamic(image: RgbImage) -> DynamicImage {
    DynamicImage::ImageRgb8(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_is_scaled_to_cover_and_cropped_in_the_middle() {
        // Left half black, right half white, 200x100 into 64x64: the middle column is the boundary.
        let wide = RgbImage::from_fn(200, 100, |x, _| {
            image::Rgb(if x < 100 { [0; 3] } else { [255; 3] })
        });
        let fitted = fit(&dynamic(wide), 64, 64).to_rgb8();
        assert_eq!(fitted.dimensions(), (64, 64));
        assert!(fitted.get_pixel(2, 30).0[0] < 10);
        assert!(fitted.get_pixel(61, 30).0[0] > 245);
    }

    #[test]
    fn the_default_size_follows_the_input_within_the_limits() {
        use limits::size_for_input;
        assert_eq!(size_for_input((64, 64), None, None), (64, 64));
        assert_eq!(size_for_input((1000, 750), None, None), (1008, 752));
        assert_eq!(size_for_input((4096, 1024), None, None), (2048, 512));
        assert_eq!(size_for_input((20, 10), None, None), (64, 64));
        assert_eq!(size_for_input((1000, 500), Some(512), None), (512, 256));
        assert_eq!(size_for_input((1000, 500), Some(512), Some(64)), (512, 64));
    }

    #[test]
    fn data_urls_and_plain_base64_both_read() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"abc");
        assert_eq!(base64_bytes("image", &b64).unwrap(), b"abc");
        assert_eq!(
            base64_bytes("image", &format!("data:image/png;base64,{b64}")).unwrap(),
            b"abc"
        );
        assert!(base64_bytes("image", "data:image/png,abc").is_err());
        assert!(base64_bytes("image", "***").is_err());
    }
}
