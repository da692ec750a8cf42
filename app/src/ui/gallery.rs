//! The gallery: every completed generation (`GET /jobs/?kind=generation&status=completed`), newest first,
//! with the settings that made it: the request's and the recipe its PNG carries.

use leptos::prelude::*;
use leptos_meta::Title;

use super::api::{self, Load};
use super::{ErrorBox, Loading};
use crate::{GenerateRequest, GenerateResponse, JobList, JobRecord};

/// How many images the gallery shows.
const LIMIT: u32 = 200;

/// A gallery card's facts, from a job's request and its recorded result.
struct Card {
    job_id: String,
    prompt: String,
    lines: Vec<String>,
    width: u32,
    height: u32,
}

fn card(job: &JobRecord) -> Option<Card> {
    let result: GenerateResponse = serde_json::from_value(job.result.clone()?).ok()?;
    let request: GenerateRequest = serde_json::from_value(job.params.clone()).unwrap_or_default();
    // The PNG's recipe says it all (the LoRAs as applied, the input image, the studio's version); a
    // generation of an older version has only its request and answer.
    let mut lines = match &result.recipe {
        Some(recipe) => super::recipe_lines(recipe),
        None => {
            let mut lines = vec![
                format!("{} · {}×{}", result.model, result.width, result.height),
                format!("{} steps · seed {}", result.steps, result.seed),
            ];
            if let Some(g) = request.guidance {
                lines.push(format!("guidance {g}"));
            }
            match request.lora.as_deref() {
                None => {}
                Some("none") => lines.push("no LoRA".into()),
                Some(lora) => lines.push(format!(
                    "LoRA {} × {}",
                    super::short_id(lora),
                    request.lora_scale.unwrap_or(1.0)
                )),
            }
            lines
        }
    };
    lines.push(format!("{:.1} s", result.elapsed_ms as f64 / 1000.0));
    Some(Card {
        job_id: job.id.clone(),
        prompt: result.prompt,
        lines,
        width: result.width,
        height: result.height,
    })
}

#[component]
pub fn GalleryPage() -> impl IntoView {
    let jobs = RwSignal::new(Load::<JobList>::Loading);
    Effect::new(move |_| {
        api::load_into(
            format!("/jobs/?kind=generation&status=completed&limit={LIMIT}"),
            jobs,
        )
    });
    view! {
        <Title text="Gallery · FLUX studio" />
        <section class="page">
            <h1>"Gallery"</h1>
            {move || match jobs.get() {
                Load::Loading => view! { <Loading what="Loading your images…" /> }.into_any(),
                Load::Failed(message) => view! { <ErrorBox message /> }.into_any(),
                Load::Ready(list) => {
                    let cards: Vec<Card> = list.jobs.iter().filter_map(card).collect();
                    if cards.is_empty() {
                        view! {
                            <div class="empty-state">
                                <p>"No images yet."</p>
                                <a class="button primary" href="/">"Describe one in the chat"</a>
                            </div>
                        }
                            .into_any()
                    } else {
                        view! {
                            <ul class="gallery">
                                {cards
                                    .into_iter()
                                    .map(|c| {
                                        let url = format!("/images/{}", c.job_id);
                                        view! {
                                            <li>
                                                <a href=url.clone() target="_blank" title="Open full size">
                                                    <img src=url.clone() alt=c.prompt.clone() loading="lazy" width=c.width height=c.height />
                                                </a>
                                                <p class="prompt">{c.prompt}</p>
                                                <ul class="meta">
                                                    {c.lines.into_iter().map(|l| view! { <li>{l}</li> }).collect_view()}
                                                </ul>
                                                <a class="button small" href=url download=format!("flux-{}.png", c.job_id)>
                                                    "Download"
                                                </a>
                                            </li>
                                        }
                                    })
                                    .collect_view()}
                            </ul>
                        }
                            .into_any()
                    }
                }
            }}
        </section>
    }
}
