//! The queue, every worker with what it holds and runs, and every job (`GET /jobs/`, `GET /health`),
//! refreshed while the page is open; running and queued jobs can be cancelled, training runs open their
//! live page.

use std::time::Duration;

use leptos::prelude::*;
use leptos_meta::Title;

use super::api::{self, Load};
use super::short_id;
use super::{ErrorBox, Loading};
use crate::{HealthResponse, JobKind, JobList, JobRecord, WorkerInfo, WorkerState};

const REFRESH: Duration = Duration::from_secs(2);
const LIMIT: u32 = 100;

#[component]
pub fn JobsPage() -> impl IntoView {
    let jobs = RwSignal::new(Load::<JobList>::Loading);
    let health = RwSignal::new(Load::<HealthResponse>::Loading);
    let action_error = RwSignal::new(None::<String>);
    let refresh = move || {
        api::load_into(format!("/jobs/?limit={LIMIT}"), jobs);
        api::load_into("/health".into(), health);
    };
    Effect::new(move |_| {
        refresh();
        if let Ok(handle) = set_interval_with_handle(refresh, REFRESH) {
            on_cleanup(move || handle.clear());
        }
    });
    let cancel = move |id: String| {
        leptos::task::spawn_local(async move {
            match api::post_empty(&format!("/jobs/{id}/cancel")).await {
                Ok(()) => refresh(),
                Err(message) => action_error.set(Some(format!("Could not cancel: {message}"))),
            }
        });
    };
    view! {
        <Title text="Jobs · FLUX studio" />
        <section class="page">
            <h1>"Jobs"</h1>
            {move || match health.get() {
                Load::Ready(h) => {
                    view! {
                        <ul class="capabilities">
                            <li>
                                {format!(
                                    "Generation queue: {} waiting of {}",
                                    h.generation_queue.waiting,
                                    h.generation_queue.capacity,
                                )}
                            </li>
                            <li>
                                {format!(
                                    "Training queue: {} waiting of {}",
                                    h.training_queue.waiting,
                                    h.training_queue.capacity,
                                )}
                            </li>
                            {h
                                .capabilities
                                .into_iter()
                                .filter(|c| !c.available)
                                .map(|c| {
                                    view! {
                                        <li class="unavailable">
                                            {format!(
                                                "{} unavailable: {}",
                                                c.name,
                                                c.reason.unwrap_or_default(),
                                            )}
                                        </li>
                                    }
                                })
                                .collect_view()}
                        </ul>
                        <Workers workers=h.workers />
                    }
                        .into_any()
                }
                _ => ().into_any(),
            }}
            {move || action_error.get().map(|message| view! { <ErrorBox message /> })}
            {move || match jobs.get() {
                Load::Loading => view! { <Loading what="Loading jobs…" /> }.into_any(),
                Load::Failed(message) => view! { <ErrorBox message /> }.into_any(),
                Load::Ready(list) if list.jobs.is_empty() => {
                    view! {
                        <div class="empty-state">
                            <p>"No jobs yet: generations and training runs show up here."</p>
                        </div>
                    }
                        .into_any()
                }
                Load::Ready(list) => {
                    view! {
                        <table class="jobs">
                            <thead>
                                <tr>
                                    <th scope="col">"Job"</th>
                                    <th scope="col">"Kind"</th>
                                    <th scope="col">"Status"</th>
                                    <th scope="col">"Progress"</th>
                                    <th scope="col">"Worker"</th>
                                    <th scope="col">"What"</th>
                                    <th scope="col">
                                        <span class="sr-only">"Actions"</span>
                                    </th>
                                </tr>
                            </thead>
                            <tbody>
                                {list.jobs.into_iter().map(|job| view! { <JobRow job cancel /> }).collect_view()}
                            </tbody>
                        </table>
                    }
                        .into_any()
                }
            }}
        </section>
    }
}

/// Every worker: its device, what it is doing, the models and LoRAs it holds, its jobs.
#[component]
fn Workers(workers: Vec<WorkerInfo>) -> impl IntoView {
    let or_none = |list: Vec<String>| {
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    view! {
        <h2>"Workers"</h2>
        <ul class="capabilities workers">
            {workers
                .into_iter()
                .map(|w| {
                    let state = match w.state {
                        WorkerState::Idle => "idle",
                        WorkerState::Generating => "generating",
                        WorkerState::Training => "training",
                    };
                    let running = [("generating", w.current_job), ("training", w.training_job)]
                        .into_iter()
                        .filter_map(|(what, id)| id.map(|id| format!("{what} {}", short_id(&id))))
                        .collect::<Vec<_>>()
                        .join(", ");
                    view! {
                        <li>
                            <strong>
                                {match &w.node {
                                    Some(node) => format!("{node} · worker {} ", w.id),
                                    None => format!("Worker {} ", w.id),
                                }}
                            </strong>
                            <code>{w.device}</code>
                            " "
                            <span class="badge" data-status=state>
                                {state}
                            </span>
                            {format!(
                                " · models: {} · LoRAs: {}{}{} · {} jobs taken",
                                or_none(w.models),
                                or_none(w.loras),
                                if running.is_empty() { "" } else { " · " },
                                running,
                                w.jobs_taken,
                            )}
                        </li>
                    }
                })
                .collect_view()}
        </ul>
    }
}

/// A job's request in a few words: the prompt, or the trigger words.
fn describe(job: &JobRecord) -> String {
    let field = match job.kind {
        JobKind::Generation => job
            .params
            .get("prompt")
            .and_then(|p| p.as_str())
            .map(str::to_owned),
        JobKind::Training => job
            .params
            .get("keywords")
            .and_then(|k| k.as_array())
            .map(|k| {
                k.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
    };
    field.unwrap_or_default()
}

#[component]
fn JobRow(job: JobRecord, cancel: impl Fn(String) + Copy + Send + Sync + 'static) -> impl IntoView {
    let id = job.id.clone();
    let link = match job.kind {
        JobKind::Training => format!("/studio/train/{}", job.id),
        JobKind::Generation if job.result.is_some() => format!("/images/{}", job.id),
        JobKind::Generation => String::new(),
    };
    let progress = if job.total_steps > 0 {
        format!("{}/{}", job.step, job.total_steps)
    } else {
        "—".into()
    };
    let finished = job.status.is_finished();
    view! {
        <tr>
            <td>
                {if link.is_empty() {
                    view! { <code>{short_id(&job.id).to_owned()}</code> }.into_any()
                } else {
                    view! {
                        <a href=link>
                            <code>{short_id(&job.id).to_owned()}</code>
                        </a>
                    }
                        .into_any()
                }}
            </td>
            <td>{job.kind.as_str()}</td>
            <td>
                <span class="badge" data-status=job.status.as_str()>
                    {job.status.as_str()}
                </span>
                {job.error.clone().map(|e| view! { <small class="job-error">{e}</small> })}
            </td>
            <td>{progress}</td>
            <td>{job.worker.map(|w| w.to_string()).unwrap_or_else(|| "—".into())}</td>
            <td class="what">{describe(&job)}</td>
            <td>
                {(!finished)
                    .then(|| {
                        view! {
                            <button class="secondary small" on:click=move |_| cancel(id.clone())>
                                "Cancel"
                            </button>
                        }
                    })}
            </td>
        </tr>
    }
}
