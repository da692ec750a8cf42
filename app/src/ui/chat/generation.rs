//! One generation in the thread: progress, preview, result and its actions.

use leptos::prelude::*;

use super::edit::{input_url, EditTarget, InputImage};
use super::progress::{GenState, Phase};
use super::state::ChatState;
use crate::ui::api;
use crate::ui::{short_id, ErrorBox};
use crate::GenerateRequest;

#[component]
pub(super) fn GenerationView(
    chat: ChatState,
    request: GenerateRequest,
    state: RwSignal<GenState>,
) -> impl IntoView {
    let summary = settings_summary(&request);
    let again = request.clone();
    let request_for_actions = request.clone();
    let original = input_url(&request);
    let phase = move || state.with(|s| s.phase);
    let status_text = move || {
        state.with(|s| match s.phase {
            Phase::Connecting => "Connecting…".to_string(),
            Phase::Queued => "Waiting in the queue…".to_string(),
            Phase::Running if s.total == 0 => "Loading the model…".to_string(),
            Phase::Running => format!("Step {} of {}", s.step, s.total),
            Phase::Done => s
                .result
                .as_ref()
                .map(|r| format!("Done in {:.1} s", r.elapsed_ms as f64 / 1000.0))
                .unwrap_or_else(|| "Done".into()),
            Phase::Failed => "Failed".to_string(),
            Phase::Cancelled => "Cancelled".to_string(),
        })
    };
    let cancel = move |_| {
        let Some(job) = state.with_untracked(|s| s.job_id.clone()) else {
            return;
        };
        state.update(|s| s.cancelling = true);
        leptos::task::spawn_local(async move {
            if let Err(message) = api::post_empty(&format!("/jobs/{job}/cancel")).await {
                state.update(|s| {
                    s.cancelling = false;
                    s.error = Some(format!("Could not cancel: {message}"));
                });
            }
        });
    };
    view! {
        <article class="msg studio generation" data-phase=move || format!("{:?}", phase()).to_lowercase()>
            <header>
                <p class="prompt">{request.prompt.clone()}</p>
                <p class="summary">{summary}</p>
            </header>
            <div class="canvas-row" class:beside=original.is_some()>
                {original
                    .clone()
                    .map(|url| {
                        view! {
                            <figure class="original">
                                <img class="original" src=url alt="Original image" />
                                <figcaption>"Original"</figcaption>
                            </figure>
                        }
                    })}
            <div class="canvas" class:grid=move || state.with(|s| image_count(s) > 1)>
                {move || {
                    state
                        .with(|s| {
                            if let Some(result) = &s.result {
                                let count = result.images.len();
                                let size = (result.width, result.height);
                                image_urls(result)
                                    .into_iter()
                                    .enumerate()
                                    .map(|(i, url)| {
                                        let full = url.clone();
                                        let input = InputImage::of_job(&result.job_id, i as u32, count, size);
                                        let target = EditTarget {
                                            input: input.clone(),
                                            prompt: request_for_actions.prompt.clone(),
                                            model: request_for_actions.model.clone(),
                                        };
                                        let varied = request_for_actions.clone();
                                        view! {
                                            <figure class="result-image">
                                                <button
                                                    class="image-button"
                                                    title="View full size"
                                                    on:click=move |_| chat.lightbox.set(Some(full.clone()))
                                                >
                                                    <img
                                                        class="result"
                                                        src=url
                                                        alt=format!("Generated {}: {}", i + 1, result.prompt)
                                                        width=result.width
                                                        height=result.height
                                                    />
                                                </button>
                                                <div class="image-actions">
                                                    <button
                                                        class="secondary small"
                                                        title="Change this image by an instruction, or repaint part of it"
                                                        on:click=move |_| chat.editing.set(Some(target.clone()))
                                                    >
                                                        "Edit"
                                                    </button>
                                                    <button
                                                        class="secondary small"
                                                        title="The same prompt with new seeds"
                                                        on:click=move |_| chat.variations(&varied)
                                                    >
                                                        "Variations"
                                                    </button>
                                                    <button
                                                        class="secondary small"
                                                        title="Start the next message from this image"
                                                        on:click=move |_| {
                                                            chat.input.set(Some(input.clone()));
                                                            chat.notice.set(Some("The image is the input of your next message: describe the change.".into()));
                                                        }
                                                    >
                                                        "Use as input"
                                                    </button>
                                                </div>
                                            </figure>
                                        }
                                    })
                                    .collect_view()
                                    .into_any()
                            } else if !s.previews.is_empty() {
                                let sharpness = if s.total == 0 {
                                    0.0
                                } else {
                                    f64::from(s.step) / f64::from(s.total)
                                };
                                s.previews
                                    .iter()
                                    .enumerate()
                                    .map(|(i, preview)| {
                                        view! {
                                            <img
                                                class="preview"
                                                src=preview.clone()
                                                alt=format!("Preview {} at step {}", i + 1, s.step)
                                                style=format!("filter: blur({:.1}px)", (1.0 - sharpness) * 6.0)
                                            />
                                        }
                                    })
                                    .collect_view()
                                    .into_any()
                            } else if s.phase.is_over() {
                                view! { <div class="placeholder">"No image"</div> }.into_any()
                            } else {
                                view! {
                                    <div class="placeholder">
                                        <span class="spinner" aria-hidden="true"></span>
                                    </div>
                                }
                                    .into_any()
                            }
                        })
                }}
            </div>
            </div>
            <div class="progress-row">
                <progress
                    max=move || state.with(|s| s.total.max(1))
                    value=move || state.with(|s| if s.phase == Phase::Done { s.total.max(1) } else { s.step })
                    aria-label="Generation progress"
                ></progress>
                <span class="status" role="status">
                    {status_text}
                </span>
            </div>
            {move || state.with(|s| s.error.clone()).map(|message| view! { <ErrorBox message /> })}
            <div class="actions">
                <Show when=move || !phase().is_over()>
                    <button
                        class="secondary"
                        on:click=cancel
                        disabled=move || state.with(|s| s.job_id.is_none() || s.cancelling)
                    >
                        {move || if state.with(|s| s.cancelling) { "Cancelling…" } else { "Cancel" }}
                    </button>
                </Show>
                {move || {
                    state
                        .with(|s| s.result.clone())
                        .map(|result| {
                            let seed = result.seed;
                            let full = format!("/images/{}", result.job_id);
                            let href = full.clone();
                            let download = format!("flux-{seed}.png");
                            view! {
                                <a class="button" href=href download=download>
                                    "Download"
                                </a>
                                <button
                                    class="secondary"
                                    on:click=move |_| {
                                        leptos::task::spawn_local(async move {
                                            match api::copy_text(&seed.to_string()).await {
                                                Ok(()) => state.update(|s| s.copied = true),
                                                Err(message) => state.update(|s| s.error = Some(message)),
                                            }
                                        })
                                    }
                                >
                                    {move || {
                                        if state.with(|s| s.copied) {
                                            format!("Seed {seed} copied")
                                        } else {
                                            format!("Copy seed {seed}")
                                        }
                                    }}
                                </button>
                                <button
                                    class="secondary"
                                    title="Put this seed in the settings"
                                    on:click=move |_| chat.settings.seed.set(seed.to_string())
                                >
                                    "Reuse seed"
                                </button>
                                <button
                                    class="secondary"
                                    on:click=move |_| chat.lightbox.set(Some(full.clone()))
                                >
                                    "View full size"
                                </button>
                            }
                        })
                }}
                <Show when=move || phase().is_over()>
                    {
                        let again = again.clone();
                        view! {
                            <button
                                class="secondary"
                                title="Same settings, a new random seed"
                                on:click=move |_| {
                                    chat.start(GenerateRequest {
                                        seed: None,
                                        ..again.clone()
                                    })
                                }
                            >
                                "Regenerate"
                            </button>
                        }
                    }
                </Show>
            </div>
        </article>
    }
    .into_any()
}

/// How many pictures the canvas shows: the result's, else the previews'.
fn image_count(s: &GenState) -> usize {
    match &s.result {
        Some(result) => result.images.len().max(1),
        None => s.previews.len(),
    }
}

/// The download address of each image of a result: `/images/{job}` for one, `/images/{job}/{i}` for
/// several.
fn image_urls(result: &crate::GenerateResponse) -> Vec<String> {
    if result.images.is_empty() {
        vec![format!("/images/{}", result.job_id)]
    } else {
        (0..result.images.len())
            .map(|i| format!("/images/{}/{i}", result.job_id))
            .collect()
    }
}

/// The non-default settings of a request, in a line.
pub(super) fn settings_summary(request: &GenerateRequest) -> String {
    let mut parts = vec![request
        .model
        .clone()
        .unwrap_or_else(|| "default model".into())];
    if let (Some(w), Some(h)) = (request.width, request.height) {
        parts.push(format!("{w}×{h}"));
    }
    if let Some(steps) = request.steps {
        parts.push(format!("{steps} steps"));
    }
    if let Some(g) = request.guidance {
        parts.push(format!("guidance {g}"));
    }
    match request.lora.as_deref() {
        Some("none") => parts.push("no LoRA".into()),
        Some(lora) => parts.push(format!(
            "LoRA {} × {}",
            short_id(lora),
            request.lora_scale.unwrap_or(1.0)
        )),
        None => {}
    }
    if let Some(seed) = request.seed {
        parts.push(format!("seed {seed}"));
    }
    if let Some(n) = request.num_images.filter(|&n| n > 1) {
        parts.push(format!("{n} images"));
    }
    if let Some(precision) = request.precision {
        parts.push(precision.as_str().to_owned());
    }
    if request.has_input() {
        let strength = request.strength.unwrap_or(crate::limits::DEFAULT_STRENGTH);
        parts.push(match &request.mask {
            Some(_) => format!("inpainting, strength {strength}"),
            None => format!("from an image, strength {strength}"),
        });
    }
    parts.join(" · ")
}
