//! The panel that edits the generation settings.

use leptos::prelude::*;

use super::state::ChatState;
use crate::ui::api::Load;
use crate::ui::sizes::{dimensions, ASPECTS, SIDES};
use crate::ui::{short_id, ErrorBox, Loading};

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
                                // The loaded model's memory plan, in one line under the picker.
                                let plan = models
                                    .presets
                                    .iter()
                                    .find_map(|p| p.memory_plan.as_ref())
                                    .map(|plan| format!("Memory plan: {}", plan.summary));
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
                                    {plan.map(|line| view! { <small class="memory-plan">{line}</small> })}
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
                                aria-pressed=move || (s.aspect.get().is_none() && s.exact_size.get().is_none()).to_string()
                                on:click=move |_| {
                                    s.exact_size.set(None);
                                    s.aspect.set(None)
                                }
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
                                            aria-pressed=move || (s.aspect.get() == Some(i) && s.exact_size.get().is_none()).to_string()
                                            on:click=move |_| {
                                                s.exact_size.set(None);
                                                s.aspect.set(Some(i))
                                            }
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
                        {move || {
                            s.exact_size
                                .get()
                                .map(|(w, h)| {
                                    view! { <p class="hint exact-size">{format!("{w} × {h}, from a dropped image")}</p> }
                                })
                        }}
                    </fieldset>
                    <div class="pair">
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
                        <label>
                            "Images"
                            <select on:change=move |ev| {
                                if let Ok(n) = event_target_value(&ev).parse() {
                                    s.num_images.set(n)
                                }
                            }>
                                {(1..=crate::limits::MAX_IMAGES)
                                    .map(|n| {
                                        view! {
                                            <option value=n.to_string() selected=move || s.num_images.get() == n>
                                                {n.to_string()}
                                            </option>
                                        }
                                    })
                                    .collect_view()}
                            </select>
                        </label>
                    </div>
                    <label title="fp8: the transformer's products in fp8, faster and not exact; exact: bf16 as diffusers computes">
                        "Precision"
                        <select
                            class="precision"
                            on:change=move |ev| s.precision.set(event_target_value(&ev))
                        >
                            {[("", "as the model is loaded"), ("exact", "exact (bf16)"), ("fp8", "fp8 (faster)")]
                                .into_iter()
                                .map(|(value, label)| {
                                    view! {
                                        <option value=value selected=move || s.precision.get() == value>
                                            {label}
                                        </option>
                                    }
                                })
                                .collect_view()}
                        </select>
                    </label>
                </div>
            </details>
        </aside>
    }
    .into_any()
}
