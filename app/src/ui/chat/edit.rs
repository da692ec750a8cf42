//! Editing what the studio made, the facts of it: the input image the next message starts from, what a
//! request starts from and the prompt of an edit (docs/ui.md#editing-images). Which message is a
//! follow-up is `app::prompt`'s rule; the components that show all this are in `editor`.

use crate::prompt::{follow_up_change, merge_follow_up};
use crate::ui::api;
use crate::GenerateRequest;

/// An image the next generation starts from.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct InputImage {
    /// Where the browser shows it from: `/images/...` or a data URL.
    pub(super) url: String,
    pub(super) source: InputSource,
    pub(super) width: u32,
    pub(super) height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum InputSource {
    /// An image of a generation of this studio.
    Job { job_id: String, index: u32 },
    /// A dropped or pasted file, as a data URL (the API takes it as it is).
    Upload(String),
}

impl InputImage {
    /// Image `index` of a finished generation.
    pub(super) fn of_job(job_id: &str, index: u32, count: usize, size: (u32, u32)) -> InputImage {
        InputImage {
            url: image_url(job_id, index, count),
            source: InputSource::Job {
                job_id: job_id.to_owned(),
                index,
            },
            width: size.0,
            height: size.1,
        }
    }

    /// Makes `request` start from this image: the input's own size (the settings' size is left out),
    /// with `strength` and, for inpainting, `mask` (base64 PNG, white = repaint).
    pub(super) fn apply(&self, request: &mut GenerateRequest, strength: f32, mask: Option<String>) {
        match &self.source {
            InputSource::Job { job_id, index } => {
                request.image_job = Some(job_id.clone());
                request.image_index = Some(*index).filter(|&i| i > 0);
            }
            InputSource::Upload(data_url) => request.image = Some(data_url.clone()),
        }
        request.width = None;
        request.height = None;
        request.strength = Some(strength);
        request.mask = mask;
    }
}

/// The address of image `index` of a job that made `count` images.
pub(super) fn image_url(job_id: &str, index: u32, count: usize) -> String {
    if count > 1 {
        format!("/images/{job_id}/{index}")
    } else {
        format!("/images/{job_id}")
    }
}

/// The address the browser shows a request's input image from, when it has one.
pub(super) fn input_url(request: &GenerateRequest) -> Option<String> {
    match (&request.image_job, &request.image) {
        (Some(job), _) => Some(match request.image_index {
            Some(i) if i > 0 => format!("/images/{job}/{i}"),
            _ => format!("/images/{job}"),
        }),
        (None, Some(data_url)) if data_url.starts_with("data:") => Some(data_url.clone()),
        (None, Some(base64)) => Some(api::png_data_url(base64)),
        (None, None) => None,
    }
}

/// The prompt of an edit: an instruction model (FLUX.1-Kontext) reads the instruction alone; any other
/// model redraws the picture from a description, so the instruction joins the prompt that made it.
/// The instruction's change is merged as a follow-up's is (`app::prompt`): "make it blue" adds "blue".
pub(super) fn edit_prompt(model: Option<&str>, previous: &str, instruction: &str) -> String {
    let instruction = instruction.trim();
    if model.is_some_and(|m| m.contains("kontext")) || previous.trim().is_empty() {
        instruction.to_owned()
    } else {
        let change = follow_up_change(instruction).unwrap_or_else(|| instruction.to_owned());
        merge_follow_up(previous, &change)
    }
}

/// What the edit dialog works on.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EditTarget {
    pub(super) input: InputImage,
    /// The prompt that made the image (empty for an uploaded one).
    pub(super) prompt: String,
    pub(super) model: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_prompt_keeps_the_description_except_for_an_instruction_model() {
        assert_eq!(
            edit_prompt(None, "a red fox", "at night"),
            "a red fox, at night"
        );
        assert_eq!(
            edit_prompt(Some("flux-kontext-dev"), "a red fox", "make it night"),
            "make it night"
        );
        assert_eq!(
            edit_prompt(None, "a red fox", "make it blue"),
            "a red fox, blue"
        );
        assert_eq!(edit_prompt(None, "a red fox", "  "), "a red fox");
        assert_eq!(edit_prompt(None, "", "a cat"), "a cat");
    }

    #[test]
    fn an_input_image_replaces_the_size_and_names_its_source() {
        let mut request = GenerateRequest {
            prompt: "a".into(),
            width: Some(512),
            height: Some(512),
            ..Default::default()
        };
        let input = InputImage::of_job("j", 2, 4, (64, 64));
        assert_eq!(input.url, "/images/j/2");
        input.apply(&mut request, 0.6, Some("data:image/png;base64,AA".into()));
        assert_eq!((request.width, request.height), (None, None));
        assert_eq!(
            (request.image_job.as_deref(), request.image_index),
            (Some("j"), Some(2))
        );
        assert_eq!(request.strength, Some(0.6));
        assert!(request.validate().is_ok());
        assert_eq!(input_url(&request).as_deref(), Some("/images/j/2"));
    }
}
