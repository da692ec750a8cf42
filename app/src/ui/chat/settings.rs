//! The generation settings: what the form holds, the request it makes, and the panel that edits them.

use leptos::prelude::*;

use super::generation::short_id;
use super::state::ChatState;
use crate::ui::api::Load;
use crate::ui::sizes::{dimensions, ASPECTS, SIDES};
use crate::ui::{ErrorBox, Loading};
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
        let size = self
            .aspect
            .get_untracked()
            .map(|i| dimensions(ASPECTS[i].1, self.side.get_untracked()));
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
        };
        request.validate()?;
        Ok(request)
    }
}

#[component]
pub(super) fn SettingsPanel(chat: ChatState) -> impl IntoView {
    let s = chat.settings;
    // Open beside the chat on wide screens; folded above it on phones, where it would push the chat away.
    let open = RwSignal::new(true);
    Effect::new(move |_| {
        let narrow = window()
            .match_media("(max-width: 760px)")
            .ok()
            .flatten()
            .is_some_and(|query| query.matches());
        open.set(!narrow);
    });
    view! {
        <aside class="settings" aria-label="Generation settings">
            <details prop:open=move || open.get()>
                <summary>"Settings"</summary>
                <div class="fields">
                    <label>
                        "Model"
                        {move || match chat.models.get() {
                            Load::Loading => view! { <Loading what="Loading models…" /> }.into_any(),
                            Load::Failed(message) => view! { <ErrorBox message /> }.into_any(),
                            Load::Ready(models) => {
                                let default = models.default_preset.clone().unwrap_or_default();
                                view! {
                                    <select on:change=move |ev| s.model.set(event_target_value(&ev))>
                                        <option value="" selected=move || s.model.with(String::is_empty)>
                                            {format!("Server default ({default})")}
                                        </option>
                                        {models
                                            .presets
                                            .into_iter()
                                            .map(|p| {
                                                let state = match p.state {
                                                    crate::ModelState::Absent => " — downloads on first use".to_string(),
                                                    crate::ModelState::Downloading { progress } => {
                                                        format!(" — downloading {:.0}%", progress * 100.0)
                                                    }
                                                    crate::ModelState::Ready => String::new(),
                                                    crate::ModelState::Loaded => " — loaded".to_string(),
                                                };
                                                let id = p.id.clone();
                                                view! {
                                                    <option value=p.id.clone() selected=move || s.model.with(|m| *m == id)>
                                                        {format!("{}{state}", p.description)}
                                                    </option>
                                                }
                                            })
                                            .collect_view()}
                                    </select>
                                }
                                    .into_any()
                            }
                        }}
                    </label>
                    <label>
                        "LoRA"
                        <select on:change=move |ev| s.lora.set(event_target_value(&ev))>
                            <option value="" selected=move || s.lora.with(String::is_empty)>
                                "The model's default"
                            </option>
                            <option value="none" selected=move || s.lora.with(|l| l == "none")>
                                "None"
                            </option>
                            {move || match chat.loras.get() {
                                Load::Ready(list) => {
                                    list.loras
                                        .into_iter()
                                        .map(|l| {
                                            let label = format!(
                                                "Yours: {} ({})",
                                                l.keywords.join(", "),
                                                short_id(&l.model_id),
                                            );
                                            let id = l.model_id.clone();
                                            view! {
                                                <option value=l.model_id.clone() selected=move || s.lora.with(|v| *v == id)>
                                                    {label}
                                                </option>
                                            }
                                        })
                                        .collect_view()
                                        .into_any()
                                }
                                _ => ().into_any(),
                            }}
                        </select>
                    </label>
                    {move || match chat.loras.get() {
                        Load::Failed(message) => {
                            view! { <ErrorBox message=format!("Your LoRAs could not be listed: {message}") /> }
                                .into_any()
                        }
                        _ => ().into_any(),
                    }}
                    <label>
                        {move || format!("LoRA scale: {:.2}", s.lora_scale.get())}
                        <input
                            type="range"
                            min="0"
                            max="2"
                            step="0.05"
                            prop:value=move || s.lora_scale.get().to_string()
                            on:input=move |ev| {
                                if let Ok(v) = event_target_value(&ev).parse() {
                                    s.lora_scale.set(v)
                                }
                            }
                            disabled=move || s.lora.with(|l| l.is_empty() || l == "none")
                        />
                    </label>
                    <div class="pair">
                        <label>
                            "Steps"
                            <input
                                type="number"
                                min="1"
                                max=crate::limits::MAX_STEPS
                                placeholder="default"
                                prop:value=move || s.steps.get()
                                on:input=move |ev| s.steps.set(event_target_value(&ev))
                            />
                        </label>
                        <label>
                            "Guidance"
                            <input
                                type="number"
                                min="0"
                                max=crate::limits::MAX_GUIDANCE
                                step="0.5"
                                placeholder="default"
                                prop:value=move || s.guidance.get()
                                on:input=move |ev| s.guidance.set(event_target_value(&ev))
                            />
                        </label>
                    </div>
                    <fieldset>
                        <legend>"Size"</legend>
                        <div class="aspects" role="group">
                            <button
                                type="button"
                                aria-pressed=move || s.aspect.get().is_none().to_string()
                                on:click=move |_| s.aspect.set(None)
                            >
                                "Default"
                            </button>
                            {ASPECTS
                                .iter()
                                .enumerate()
                                .map(|(i, (label, _))| {
                                    view! {
                                        <button
                                            type="button"
                                            aria-pressed=move || (s.aspect.get() == Some(i)).to_string()
                                            on:click=move |_| s.aspect.set(Some(i))
                                        >
                                            {*label}
                                        </button>
                                    }
                                })
                                .collect_view()}
                        </div>
                        <select
                            aria-label="Size"
                            disabled=move || s.aspect.get().is_none()
                            on:change=move |ev| {
                                if let Ok(v) = event_target_value(&ev).parse() {
                                    s.side.set(v)
                                }
                            }
                        >
                            {SIDES
                                .iter()
                                .map(|side| {
                                    view! {
                                        <option value=side.to_string() selected=move || s.side.get() == *side>
                                            {move || {
                                                let (w, h) = dimensions(
                                                    s.aspect.get().map_or(1.0, |i| ASPECTS[i].1),
                                                    *side,
                                                );
                                                format!("{w} × {h}")
                                            }}
                                        </option>
                                    }
                                })
                                .collect_view()}
                        </select>
                    </fieldset>
                    <label>
                        "Seed"
                        <input
                            type="number"
                            min="0"
                            placeholder="random"
                            prop:value=move || s.seed.get()
                            on:input=move |ev| s.seed.set(event_target_value(&ev))
                        />
                    </label>
                </div>
            </details>
        </aside>
    }
    .into_any()
}
