//! A training run, live: `GET /train/status/{id}` for where it stands, then `/ws/train/{id}` for its log
//! replayed and its live events (status, steps with loss, samples, log lines, errors). Cancel and resume
//! use the public routes; a finished run offers its LoRA for download and for generating at once.

use futures_util::StreamExt;
use gloo_net::websocket::futures::WebSocket;
use gloo_net::websocket::Message;
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_params_map;

use super::super::api;
use super::super::chart;
use super::super::{ErrorBox, Loading};
use crate::ui::{recipe_lines, short_id};
use crate::{EventBody, JobEvent, JobStatus, Recipe, TrainStatus};

/// Everything the page shows, folded from the status answer and the stream.
#[derive(Debug, Clone, Default)]
struct Run {
    status: Option<JobStatus>,
    keywords: Vec<String>,
    step: u32,
    total: u32,
    /// (step, loss) of every step event.
    losses: Vec<(u32, f32)>,
    learning_rate: Option<f64>,
    /// (step, url, recipe), in order.
    samples: Vec<(u32, String, Option<Box<Recipe>>)>,
    log: Vec<String>,
    error: Option<String>,
    /// The trainer's estimate of the seconds left, from its latest step event.
    eta: Option<f64>,
    /// The last event applied: a replay after reconnecting repeats what came before it.
    seq: u64,
}

impl Run {
    fn apply(&mut self, event: JobEvent) {
        // seq 0: an error of the stream itself, no event of the job's log.
        if event.seq != 0 {
            if event.seq <= self.seq {
                return;
            }
            self.seq = event.seq;
        }
        match event.body {
            EventBody::Status { status } => {
                self.status = Some(status);
                if !status.is_finished() {
                    self.error = None;
                }
            }
            EventBody::Log { message } => self.log.push(message),
            EventBody::Step {
                step,
                total,
                loss,
                learning_rate,
                eta_seconds,
                ..
            } => {
                self.step = step;
                self.total = total;
                if let Some(loss) = loss {
                    self.losses.push((step, loss));
                }
                self.learning_rate = learning_rate.or(self.learning_rate);
                self.eta = eta_seconds;
            }
            EventBody::Sample { step, url, recipe } => self.samples.push((step, url, recipe)),
            EventBody::Error { error } => self.error = Some(error.message),
            EventBody::Result(_) => {}
        }
    }

    /// Seconds left, as the trainer estimates them from its recent pace.
    fn eta_seconds(&self) -> Option<f64> {
        self.eta.filter(|_| self.step < self.total)
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

fn status_label(status: Option<JobStatus>) -> &'static str {
    match status {
        None => "connecting",
        Some(s) => s.as_str(),
    }
}

#[component]
pub fn TrainingRunPage() -> impl IntoView {
    let params = use_params_map();
    let id = move || params.with(|p| p.get("id").unwrap_or_default());
    let run = RwSignal::new(Run::default());
    let missing = RwSignal::new(None::<String>);
    let action_error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);
    // Bumped to reconnect the stream after a resume.
    let generation = RwSignal::new(0u32);

    Effect::new(move |_| {
        generation.track();
        let id = id();
        leptos::task::spawn_local_scoped_with_cancellation(async move {
            match api::get::<TrainStatus>(&format!("/train/status/{id}")).await {
                Ok(status) => run.update(|r| {
                    r.status = Some(status.status);
                    r.keywords = status.keywords;
                    r.step = status.step;
                    r.total = status.total_steps;
                    r.error = status.error;
                }),
                Err(message) => {
                    missing.set(Some(message));
                    return;
                }
            }
            let Ok(mut socket) = WebSocket::open(&api::ws_url(&format!("/ws/train/{id}"))) else {
                return action_error.set(Some("The live stream could not be opened.".into()));
            };
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message {
                    if let Ok(event) = serde_json::from_str::<JobEvent>(&text) {
                        run.update(|r| r.apply(event));
                    }
                }
            }
        });
    });

    let act = move |path: String, reconnect: bool| {
        busy.set(true);
        action_error.set(None);
        leptos::task::spawn_local(async move {
            match api::post_empty(&path).await {
                Ok(()) if reconnect => generation.update(|g| *g += 1),
                Ok(()) => {}
                Err(message) => action_error.set(Some(message)),
            }
            busy.set(false);
        });
    };
    let cancel = move |_| act(format!("/jobs/{}/cancel", id()), false);
    let resume = move |_| act(format!("/train/{}/resume", id()), true);

    view! {
        <Title text="Training · FLUX studio" />
        <section class="page training">
            {move || match missing.get() {
                Some(message) => {
                    view! {
                        <h1>"Training run"</h1>
                        <ErrorBox message />
                        <p>
                            <a href="/studio/jobs">"See every job"</a>
                            " or "
                            <a href="/studio/train">"start a new run"</a>
                            "."
                        </p>
                    }
                        .into_any()
                }
                None => {
                    view! {
                        <header class="run-head">
                            <h1>
                                "LoRA " <code>{move || short_id(&id()).to_owned()}</code>
                            </h1>
                            <span
                                class="badge"
                                data-status=move || status_label(run.with(|r| r.status))
                                role="status"
                            >
                                {move || status_label(run.with(|r| r.status))}
                            </span>
                        </header>
                        <p class="keywords">
                            {move || {
                                run.with(|r| {
                                    if r.keywords.is_empty() {
                                        String::new()
                                    } else {
                                        format!("Trigger words: {}", r.keywords.join(", "))
                                    }
                                })
                            }}
                        </p>
                        <Show when=move || run.with(|r| r.status.is_none())>
                            <Loading what="Loading the run…" />
                        </Show>
                        <div class="progress-row">
                            <progress
                                max=move || run.with(|r| r.total.max(1))
                                value=move || run.with(|r| r.step)
                                aria-label="Training progress"
                            ></progress>
                            <span class="step-count">
                                {move || {
                                    run.with(|r| {
                                        if r.total == 0 {
                                            "No steps yet".to_string()
                                        } else {
                                            format!("Step {} of {}", r.step, r.total)
                                        }
                                    })
                                }}
                            </span>
                        </div>
                        <dl class="stats">
                            <div>
                                <dt>"Loss"</dt>
                                <dd>
                                    {move || {
                                        run.with(|r| r.losses.last().map_or("—".into(), |(_, l)| format!("{l:.4}")))
                                    }}
                                </dd>
                            </div>
                            <div>
                                <dt>"Learning rate"</dt>
                                <dd>{move || run.with(|r| r.learning_rate.map_or("—".into(), |lr| format!("{lr:.2e}")))}</dd>
                            </div>
                            <div>
                                <dt>"Time left"</dt>
                                <dd>
                                    {move || {
                                        run.with(|r| {
                                            if r.status.is_some_and(JobStatus::is_finished) {
                                                "—".to_string()
                                            } else {
                                                r.eta_seconds().map_or("estimating…".into(), duration)
                                            }
                                        })
                                    }}
                                </dd>
                            </div>
                        </dl>
                        {move || run.with(|r| r.error.clone()).map(|message| view! { <ErrorBox message /> })}
                        {move || action_error.get().map(|message| view! { <ErrorBox message /> })}
                        <div class="actions">
                            <Show when=move || run.with(|r| r.status.is_some_and(|s| !s.is_finished()))>
                                <button class="secondary" on:click=cancel disabled=move || busy.get()>
                                    "Cancel"
                                </button>
                            </Show>
                            <Show when=move || {
                                run.with(|r| {
                                    matches!(
                                        r.status,
                                        Some(JobStatus::Cancelled | JobStatus::Failed | JobStatus::Interrupted)
                                    )
                                })
                            }>
                                <button class="primary" on:click=resume disabled=move || busy.get()>
                                    "Resume"
                                </button>
                            </Show>
                            <Show when=move || run.with(|r| r.status == Some(JobStatus::Completed))>
                                <a class="button primary" href=move || format!("/?lora={}", id())>
                                    "Generate with this LoRA"
                                </a>
                                <a class="button" href=move || format!("/loras/{}", id()) download="">
                                    "Download LoRA"
                                </a>
                            </Show>
                        </div>
                        <h2>"Loss"</h2>
                        <LossChart run />
                        <h2>"Samples"</h2>
                        {move || {
                            run.with(|r| {
                                if r.samples.is_empty() {
                                    view! { <p class="empty">"Sample images appear here as the run makes them."</p> }
                                        .into_any()
                                } else {
                                    view! {
                                        <ul class="samples">
                                            {r
                                                .samples
                                                .iter()
                                                .rev()
                                                .map(|(step, url, recipe)| {
                                                    view! {
                                                        <li>
                                                            <img src=url.clone() alt=format!("Sample at step {step}") />
                                                            <span>{format!("step {step}")}</span>
                                                            {recipe
                                                                .as_ref()
                                                                .map(|r| {
                                                                    view! {
                                                                        <details class="recipe">
                                                                            <summary>"Recipe"</summary>
                                                                            <p class="prompt">{r.prompt.clone()}</p>
                                                                            <ul>
                                                                                {recipe_lines(r)
                                                                                    .into_iter()
                                                                                    .map(|line| view! { <li>{line}</li> })
                                                                                    .collect_view()}
                                                                            </ul>
                                                                        </details>
                                                                    }
                                                                })}
                                                        </li>
                                                    }
                                                })
                                                .collect_view()}
                                        </ul>
                                    }
                                        .into_any()
                                }
                            })
                        }}
                        <h2>"Log"</h2>
                        <ol class="log" aria-live="polite">
                            {move || {
                                run.with(|r| {
                                    r.log.iter().map(|line| view! { <li>{line.clone()}</li> }).collect_view()
                                })
                            }}
                        </ol>
                    }
                        .into_any()
                }
            }}
        </section>
    }
    .into_any()
}

#[component]
fn LossChart(run: RwSignal<Run>) -> impl IntoView {
    let view_box = format!("0 0 {} {}", chart::WIDTH, chart::HEIGHT);
    move || {
        run.with(|r| match chart::loss_path(&r.losses) {
            None => view! { <p class="empty">"The loss curve appears after the first steps."</p> }.into_any(),
            Some((d, lo, hi)) => {
                view! {
                    <figure class="chart">
                        <svg viewBox=view_box.clone() role="img" aria-label=format!("Loss from {hi:.4} to {lo:.4}")>
                            <path d=d fill="none" stroke="currentColor" stroke-width="2" vector-effect="non-scaling-stroke" />
                        </svg>
                        <figcaption>
                            {format!("{} steps · max {hi:.4} · min {lo:.4}", r.losses.len())}
                        </figcaption>
                    </figure>
                }
                    .into_any()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(seq: u64, at: i64, step: u32, loss: f32) -> JobEvent {
        JobEvent {
            job_id: "j".into(),
            seq,
            at,
            body: EventBody::Step {
                step,
                total: 100,
                loss: Some(loss),
                learning_rate: Some(1e-4),
                seconds_per_step: Some(1.0),
                eta_seconds: Some(f64::from(100 - step)),
                preview: None,
                image: None,
            },
        }
    }

    #[test]
    fn replayed_events_count_once_and_the_eta_is_the_trainers() {
        let mut run = Run::default();
        run.apply(step(1, 0, 1, 0.5));
        run.apply(step(2, 2000, 3, 0.4));
        run.apply(step(2, 2000, 3, 0.4));
        assert_eq!(run.losses, vec![(1, 0.5), (3, 0.4)]);
        assert_eq!(run.eta_seconds(), Some(97.0));
        assert_eq!(duration(97.0), "1 min 37 s");
        assert_eq!(duration(7300.0), "2 h 01 min");
    }
}
