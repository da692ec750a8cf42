//! Train: drop a ZIP or a set of images, see what will be used and what not (and why), name the trigger
//! words, adjust settings (empty fields keep the trainer's defaults), upload with progress to `POST /train/`,
//! then follow the run on its own page.

use leptos::ev::{DragEvent, SubmitEvent};
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_navigate;
use wasm_bindgen::JsValue;

use super::super::api;
use super::super::{ErrorBox, Loading};
use super::dataset::{self, Preview, Verdict};
use crate::TrainAccepted;

/// The dropped dataset: one ZIP as it is, or images to be packed into one.
#[derive(Clone)]
enum Dropped {
    Zip(web_sys::File),
    Images(Vec<web_sys::File>),
}

/// Optional trainer settings: (form field, label, placeholder showing the default, input step). Sent only
/// when filled in, so the trainer's own defaults apply otherwise.
const SETTINGS: [(&str, &str, &str, &str); 5] = [
    ("steps", "Steps", "trainer default", "1"),
    ("rank", "Rank", "16", "1"),
    ("alpha", "Alpha", "16", "1"),
    ("learning_rate", "Learning rate", "trainer default", "any"),
    ("seed", "Seed", "random", "1"),
];

#[derive(Clone, Copy, PartialEq)]
enum Upload {
    Idle,
    Sending(f64),
    Failed,
}

#[component]
pub fn TrainPage() -> impl IntoView {
    // Browser objects (files) live in local storage: they are neither Send nor needed on the server.
    let dropped = RwSignal::new_local(None::<Dropped>);
    let preview = RwSignal::new(None::<Preview>);
    let reading = RwSignal::new(false);
    let keywords = RwSignal::new(String::new());
    let resolution = RwSignal::new(String::new());
    let values = SETTINGS.map(|_| RwSignal::new(String::new()));
    let upload = RwSignal::new(Upload::Idle);
    let error = RwSignal::new(None::<String>);
    let dragging = RwSignal::new(false);
    let navigate = use_navigate();

    let take = move |files: Vec<web_sys::File>| {
        error.set(None);
        upload.set(Upload::Idle);
        if files.is_empty() {
            return;
        }
        let zip = files.len() == 1 && files[0].name().to_ascii_lowercase().ends_with(".zip");
        if zip {
            let file = files[0].clone();
            dropped.set(Some(Dropped::Zip(file.clone())));
            preview.set(None);
            reading.set(true);
            leptos::task::spawn_local(async move {
                preview.set(Some(dataset::preview_zip(&file).await));
                reading.set(false);
            });
        } else {
            dropped.set(Some(Dropped::Images(files.clone())));
            preview.set(None);
            reading.set(true);
            leptos::task::spawn_local(async move {
                preview.set(Some(dataset::preview_files(&files).await));
                reading.set(false);
            });
        }
    };
    let on_drop = move |ev: DragEvent| {
        ev.prevent_default();
        dragging.set(false);
        take(dataset::files_of(
            ev.data_transfer().and_then(|d| d.files()),
        ));
    };
    let on_pick = move |ev: leptos::ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&ev);
        take(dataset::files_of(input.files()));
    };

    let start = move |ev: SubmitEvent| {
        ev.prevent_default();
        let Some(set) = dropped.get_untracked() else {
            error.set(Some(
                "Drop a ZIP of images (or the images themselves) first.".into(),
            ));
            return;
        };
        // The server would answer the same refusal after the whole upload.
        if let Some(refusal) =
            preview.with_untracked(|p| p.as_ref().and_then(|p| p.refusal.clone()))
        {
            error.set(Some(format!(
                "This dataset cannot be trained on: {refusal}"
            )));
            return;
        }
        if keywords.with_untracked(|k| k.trim().is_empty()) {
            error.set(Some(
                "Give at least one trigger word: it is how prompts will call up what this LoRA learns.".into(),
            ));
            return;
        }
        error.set(None);
        upload.set(Upload::Sending(0.0));
        let navigate = navigate.clone();
        leptos::task::spawn_local(async move {
            let result = async {
                let form = web_sys::FormData::new()
                    .map_err(|_| "the browser cannot build a form".to_string())?;
                let append = |name: &str, value: &str| {
                    form.append_with_str(name, value)
                        .map_err(|_| format!("the browser refused the field {name}"))
                };
                append("keywords", &keywords.get_untracked())?;
                for ((name, ..), value) in SETTINGS.iter().zip(values) {
                    let value = value.get_untracked();
                    if !value.trim().is_empty() {
                        append(name, value.trim())?;
                    }
                }
                let resolution = resolution.get_untracked();
                if !resolution.is_empty() {
                    append("resolution", &resolution)?;
                }
                let (blob, name): (web_sys::Blob, String) = match set {
                    Dropped::Zip(file) => {
                        let name = file.name();
                        (file.into(), name)
                    }
                    Dropped::Images(files) => {
                        (dataset::zip_files(&files).await?, "dataset.zip".into())
                    }
                };
                form.append_with_blob_and_filename("dataset", &blob, &name)
                    .map_err(|e: JsValue| format!("the browser refused the dataset: {e:?}"))?;
                api::upload::<TrainAccepted>("/train/", &form, move |p| {
                    upload.set(Upload::Sending(p))
                })
                .await
            }
            .await;
            match result {
                Ok(accepted) => {
                    upload.set(Upload::Idle);
                    navigate(
                        &format!("/studio/train/{}", accepted.model_id),
                        Default::default(),
                    );
                }
                Err(message) => {
                    upload.set(Upload::Failed);
                    error.set(Some(format!("Training could not start: {message}")));
                }
            }
        });
    };

    view! {
        <Title text="Train · FLUX studio" />
        <section class="page">
            <h1>"Train a LoRA"</h1>
            <p class="lead">
                "Teach the studio a person, a style or an object from 10 to 30 photos. "
                "Each image may come with a same-name .txt caption; the trigger words are added to every caption."
            </p>
            <form class="train-form" on:submit=start>
                <label
                    class="dropzone"
                    class:dragging=move || dragging.get()
                    on:dragover=move |ev: DragEvent| {
                        ev.prevent_default();
                        dragging.set(true);
                    }
                    on:dragleave=move |_| dragging.set(false)
                    on:drop=on_drop
                >
                    <input
                        type="file"
                        id="dataset"
                        class="sr-only"
                        accept=".zip,image/png,image/jpeg,image/webp,.txt"
                        multiple
                        on:change=on_pick
                    />
                    <span class="big">"Drop a ZIP or images here"</span>
                    <span>"or press to choose files (png, jpg, jpeg, webp, with optional .txt captions)"</span>
                </label>
                <Show when=move || reading.get()>
                    <Loading what="Checking the images…" />
                </Show>
                {move || preview.get().map(|p| view! { <PreviewGrid preview=p /> })}
                <div class="fields">
                    <label>
                        "Trigger words"
                        <input
                            type="text"
                            name="keywords"
                            required
                            placeholder="e.g. mychar, film photo"
                            prop:value=move || keywords.get()
                            on:input=move |ev| keywords.set(event_target_value(&ev))
                        />
                        <small>"Comma-separated. Prompts that use this LoRA get them added when missing."</small>
                    </label>
                    <details class="advanced">
                        <summary>"Training settings"</summary>
                        <p class="hint">"Empty fields keep the trainer's defaults."</p>
                        <div class="grid-fields">
                            <label>
                                "Resolution"
                                <select on:change=move |ev| resolution.set(event_target_value(&ev))>
                                    <option value="">"Default (512)"</option>
                                    <option value="512">"512"</option>
                                    <option value="768">"768"</option>
                                    <option value="1024">"1024"</option>
                                </select>
                            </label>
                            {SETTINGS
                                .iter()
                                .zip(values)
                                .map(|((name, label, placeholder, step), value)| {
                                    view! {
                                        <label>
                                            {*label}
                                            <input
                                                type="number"
                                                name=*name
                                                min="0"
                                                step=*step
                                                placeholder=*placeholder
                                                prop:value=move || value.get()
                                                on:input=move |ev| value.set(event_target_value(&ev))
                                            />
                                        </label>
                                    }
                                })
                                .collect_view()}
                        </div>
                    </details>
                </div>
                {move || error.get().map(|message| view! { <ErrorBox message /> })}
                {move || match upload.get() {
                    Upload::Sending(p) => {
                        view! {
                            <div class="progress-row">
                                <progress max="1" value=p aria-label="Upload progress"></progress>
                                <span role="status">
                                    {if p >= 1.0 {
                                        "Uploaded; the server is checking the dataset…".to_string()
                                    } else {
                                        format!("Uploading… {:.0}%", p * 100.0)
                                    }}
                                </span>
                            </div>
                        }
                            .into_any()
                    }
                    _ => ().into_any(),
                }}
                <button
                    type="submit"
                    class="primary"
                    disabled=move || matches!(upload.get(), Upload::Sending(_))
                >
                    "Start training"
                </button>
            </form>
        </section>
    }
    .into_any()
}

#[component]
fn PreviewGrid(preview: Preview) -> impl IntoView {
    let used = preview.used();
    let rejected: Vec<_> = preview
        .files
        .iter()
        .filter_map(|f| match &f.verdict {
            Verdict::Rejected(why) => Some((f.name.clone(), why.clone())),
            _ => None,
        })
        .collect();
    let images: Vec<_> = preview
        .files
        .iter()
        .filter_map(|f| match f.verdict {
            Verdict::Used { captioned } => Some((f.name.clone(), captioned, f.thumbnail.clone())),
            _ => None,
        })
        .collect();
    view! {
        <section class="preview-grid" aria-label="Dataset preview">
            {preview.note.map(|note| view! { <p class="note">{note}</p> })}
            <h2>{format!("{used} image{} will be used", if used == 1 { "" } else { "s" })}</h2>
            {preview.refusal.map(|message| view! { <ErrorBox message /> })}
            <ul class="thumbs">
                {images
                    .into_iter()
                    .map(|(name, captioned, thumbnail)| {
                        view! {
                            <li>
                                {match thumbnail {
                                    Some(url) => view! { <img src=url alt=name.clone() loading="lazy" /> }.into_any(),
                                    None => view! { <div class="nothumb">"no preview"</div> }.into_any(),
                                }}
                                <span class="name">{name.clone()}</span>
                                <span class="tag">{if captioned { "captioned" } else { "trigger words only" }}</span>
                            </li>
                        }
                    })
                    .collect_view()}
            </ul>
            {(!rejected.is_empty())
                .then(|| {
                    view! {
                        <h3>{format!("{} file(s) left out", rejected.len())}</h3>
                        <ul class="rejected">
                            {rejected
                                .into_iter()
                                .map(|(name, why)| view! { <li><code>{name}</code>" — "{why}</li> })
                                .collect_view()}
                        </ul>
                    }
                })}
        </section>
    }
}
