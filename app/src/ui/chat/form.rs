//! The generation settings as the form holds them, and the request they make.

use leptos::prelude::*;

use crate::ui::sizes::{dimensions, ASPECTS};
use crate::GenerateRequest;

/// The generation settings, as the form holds them: text where the user may leave a field empty to get the
/// model's default.
#[derive(Clone, Copy)]
pub(super) struct Settings {
    /// A preset id; empty: the server's default preset.
    pub(super) model: RwSignal<String>,
    /// Empty: the preset's own LoRA; `none`; or a trained `model_id`.
    pub(super) lora: RwSignal<String>,
    pub(super) lora_scale: RwSignal<f32>,
    pub(super) steps: RwSignal<String>,
    pub(super) guidance: RwSignal<String>,
    /// An index into `ASPECTS`; `None`: the model's default size.
    pub(super) aspect: RwSignal<Option<usize>>,
    pub(super) side: RwSignal<u32>,
    /// Empty: a random seed for each image.
    pub(super) seed: RwSignal<String>,
    /// Images a request makes (1 to `limits::MAX_IMAGES`), shown as a grid.
    pub(super) num_images: RwSignal<u32>,
    /// A size restored from a dropped PNG's recipe; it wins over `aspect` until a size is chosen.
    pub(super) exact_size: RwSignal<Option<(u32, u32)>>,
    /// How much of the schedule reruns from an input image.
    pub(super) strength: RwSignal<f32>,
    /// `exact`, `fp8`, or empty: the server's default (the model as loaded).
    pub(super) precision: RwSignal<String>,
}

impl Settings {
    pub(super) fn new() -> Settings {
        Settings {
            model: RwSignal::new(String::new()),
            lora: RwSignal::new(String::new()),
            lora_scale: RwSignal::new(1.0),
            steps: RwSignal::new(String::new()),
            guidance: RwSignal::new(String::new()),
            aspect: RwSignal::new(None),
            side: RwSignal::new(512),
            seed: RwSignal::new(String::new()),
            num_images: RwSignal::new(1),
            exact_size: RwSignal::new(None),
            strength: RwSignal::new(crate::limits::DEFAULT_STRENGTH),
            precision: RwSignal::new(String::new()),
        }
    }

    /// The request for `prompt`, or what is wrong with a field.
    pub(super) fn request(&self, prompt: &str) -> Result<GenerateRequest, String> {
        fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<Option<T>, String> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            text.parse()
                .map(Some)
                .map_err(|_| format!("{name} must be a number, got “{text}”"))
        }
        let lora = self.lora.get_untracked();
        let size = self.exact_size.get_untracked().or_else(|| {
            self.aspect
                .get_untracked()
                .map(|i| dimensions(ASPECTS[i].1, self.side.get_untracked()))
        });
        let model = self.model.get_untracked();
        let request = GenerateRequest {
            prompt: prompt.trim().to_owned(),
            seed: number("Seed", &self.seed.get_untracked())?,
            steps: number("Steps", &self.steps.get_untracked())?,
            guidance: number("Guidance", &self.guidance.get_untracked())?,
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            lora_scale: (!lora.is_empty() && lora != "none")
                .then(|| self.lora_scale.get_untracked()),
            lora: (!lora.is_empty()).then_some(lora),
            model: (!model.is_empty()).then_some(model),
            num_images: Some(self.num_images.get_untracked()).filter(|&n| n > 1),
            precision: self.precision.get_untracked().parse().ok(),
            ..GenerateRequest::default()
        };
        request.validate()?;
        Ok(request)
    }
}
