//! Chat and generate: every message is classified by `POST /classify/`; an image request becomes a
//! generation over `/ws/generate` with live step previews, anything else gets a reply that says what the
//! studio can do. The thread lives for the whole visit (not just this page), so a generation keeps going
//! and stays visible while the user looks at the gallery or the jobs.

use futures_util::{SinkExt, StreamExt};
use gloo_net::websocket::futures::WebSocket;
use gloo_net::websocket::{Message, WebSocketError};
use leptos::ev::{KeyboardEvent, SubmitEvent};
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;

use super::api::{self, Load};
use super::reply::reply;
use super::sizes::{dimensions, ASPECTS, SIDES};
use super::{ErrorBox, Loading};
use crate::{
    ClassifyRequest, ClassifyResponse, EventBody, GenerateRequest, GenerateResponse,
    HealthResponse, JobEvent, JobStatus, Label, LoraList, ModelsResponse,
};

/// The generation settings, as the form holds them: text where the user may leave a field empty to get the
/// model's default.
#[derive(Clone, Copy)]
struct Settings {
    /// A preset id; empty: the server's default preset.
    model: RwSignal<String>,
    /// Empty: the preset's own LoRA; `none`; or a trained `model_id`.
    lora: RwSignal<String>,
    lora_scale: RwSignal<f32>,
    steps: RwSignal<String>,
    guidance: RwSignal<String>,
    /// An index into `ASPECTS`; `None`: the model's default size.
    aspect: RwSignal<Option<usize>>,
    side: RwSignal<u32>,
    /// Empty: a random seed for each image.
    seed: RwSignal<String>,
}

impl Settings {
    fn new() -> Settings {
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
    fn request(&self, prompt: &str) -> Result<GenerateRequest, String> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// One generation's live state, as its stream reports it.
#[derive(Debug, Clone)]
struct GenState {
    phase: Phase,
    job_id: Option<String>,
    step: u32,
    total: u32,
    /// A data URL of the latest step's preview.
    preview: Option<String>,
    result: Option<GenerateResponse>,
    error: Option<String>,
    cancelling: bool,
    copied: bool,
}

impl GenState {
    fn new() -> GenState {
        GenState {
            phase: Phase::Connecting,
            job_id: None,
            step: 0,
            total: 0,
            preview: None,
            result: None,
            error: None,
            cancelling: false,
            copied: false,
        }
    }

    fn finish(&mut self, mut response: GenerateResponse) {
        // The PNG stays downloadable under /images/; the thread keeps only its address.
        response.image = String::new();
        self.job_id = Some(response.job_id.clone());
        self.result = Some(response);
    }

    fn apply(&mut self, event: JobEvent) {
        self.job_id = Some(event.job_id);
        match event.body {
            EventBody::Status { status } => {
                self.phase = match status {
                    JobStatus::Queued => Phase::Queued,
                    JobStatus::Completed => Phase::Done,
                    JobStatus::Cancelled => Phase::Cancelled,
                    JobStatus::Failed | JobStatus::Interrupted => Phase::Failed,
                    _ => Phase::Running,
                }
            }
            EventBody::Step {
                step,
                total,
                preview,
                ..
            } => {
                self.phase = Phase::Running;
                self.step = step;
                self.total = total;
                if let Some(png) = preview {
                    self.preview = Some(api::png_data_url(&png));
                }
            }
            EventBody::Result(response) => self.finish(*response),
            EventBody::Error { error } => {
                self.phase = Phase::Failed;
                self.error = Some(error.message);
            }
            EventBody::Log { .. } | EventBody::Sample { .. } => {}
        }
    }
}

#[derive(Clone)]
enum Entry {
    /// The user's message and, once classified, what the classifier said.
    User {
        text: String,
        verdict: RwSignal<Option<Result<ClassifyResponse, ()>>>,
    },
    Reply(Vec<String>),
    /// The message could not be classified; offers to generate anyway.
    Unclassified {
        prompt: String,
        message: String,
    },
    Generation {
        request: GenerateRequest,
        state: RwSignal<GenState>,
    },
}

#[derive(Clone)]
struct Item {
    id: usize,
    entry: Entry,
}

/// What the chat keeps for the whole visit; provided by `App`.
#[derive(Clone, Copy)]
pub struct ChatState {
    thread: RwSignal<Vec<Item>>,
    next_id: StoredValue<usize>,
    settings: Settings,
    models: RwSignal<Load<ModelsResponse>>,
    loras: RwSignal<Load<LoraList>>,
    health: RwSignal<Option<HealthResponse>>,
    /// The image shown full size, if any.
    lightbox: RwSignal<Option<String>>,
    /// Signals of new entries belong to the app, not to the page that happened to create them.
    owner: StoredValue<Owner>,
}

impl ChatState {
    pub fn provide() {
        let state = ChatState {
            thread: RwSignal::new(Vec::new()),
            next_id: StoredValue::new(0),
            settings: Settings::new(),
            models: RwSignal::new(Load::Loading),
            loras: RwSignal::new(Load::Loading),
            health: RwSignal::new(None),
            lightbox: RwSignal::new(None),
            owner: StoredValue::new(
                Owner::current().expect("ChatState::provide runs in a component"),
            ),
        };
        provide_context(state);
    }

    fn push(&self, entry: Entry) {
        let id = self.next_id.get_value();
        self.next_id.set_value(id + 1);
        self.thread.update(|t| t.push(Item { id, entry }));
    }

    fn signal<T: Send + Sync + 'static>(&self, value: T) -> RwSignal<T> {
        self.owner
            .with_value(|owner| owner.with(|| RwSignal::new(value)))
    }

    /// The user sent a message: classify it, then generate or reply.
    fn send(self, text: String) {
        let verdict = self.signal(None);
        self.push(Entry::User {
            text: text.clone(),
            verdict,
        });
        leptos::task::spawn_local(async move {
            let answer: Result<ClassifyResponse, String> = api::post(
                "/classify/",
                &ClassifyRequest {
                    prompt: text.clone(),
                },
            )
            .await;
            match answer {
                Ok(answer) => {
                    verdict.set(Some(Ok(answer.clone())));
                    if answer.label == Label::ImageRequest {
                        self.generate(text);
                    } else {
                        let health = self.health.get_untracked();
                        self.push(Entry::Reply(reply(&text, health.as_ref())));
                    }
                }
                Err(message) => {
                    verdict.set(Some(Err(())));
                    self.push(Entry::Unclassified {
                        prompt: text,
                        message,
                    });
                }
            }
        });
    }

    /// Generates `prompt` with the current settings.
    fn generate(self, prompt: String) {
        match self.settings.request(&prompt) {
            Ok(request) => self.start(request),
            Err(message) => self.push(Entry::Unclassified { prompt, message }),
        }
    }

    fn start(self, request: GenerateRequest) {
        let state = self.signal(GenState::new());
        self.push(Entry::Generation {
            request: request.clone(),
            state,
        });
        leptos::task::spawn_local(stream_generation(request, state));
    }
}

/// Runs one generation over the WebSocket, folding its events into `state`. The socket stays open until the
/// job ends; the server cancels the job if it closes early.
async fn stream_generation(request: GenerateRequest, state: RwSignal<GenState>) {
    let fail = |message: String| {
        state.update(|s| {
            s.phase = Phase::Failed;
            s.error = Some(message);
        })
    };
    let mut socket = match WebSocket::open(&api::ws_url("/ws/generate")) {
        Ok(socket) => socket,
        Err(e) => return fail(format!("could not open the generation stream: {e}")),
    };
    let text = serde_json::to_string(&request).expect("a request serializes");
    if let Err(e) = socket.send(Message::Text(text)).await {
        return fail(format!("could not send the request: {e}"));
    }
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                if let Ok(event) = serde_json::from_value::<JobEvent>(value.clone()) {
                    state.update(|s| s.apply(event));
                } else if let Ok(EventBody::Error { error }) = serde_json::from_value(value) {
                    // Refused before queueing: a lone error without a job.
                    return fail(error.message);
                }
            }
            Ok(Message::Bytes(_)) => {}
            Err(WebSocketError::ConnectionClose(_)) => break,
            Err(e) => return fail(format!("the generation stream failed: {e}")),
        }
    }
    if !state.get_untracked().phase.is_over() {
        fail("the connection to the studio closed before the image was finished".into());
    }
}

#[component]
pub fn ChatPage() -> impl IntoView {
    let chat = expect_context::<ChatState>();
    let query = use_query_map();
    Effect::new(move |_| {
        // Once per visit: the lists the settings offer, and what this server can do.
        if matches!(chat.models.get_untracked(), Load::Loading) {
            api::load_into("/models/".into(), chat.models);
        }
        api::load_into("/loras/".into(), chat.loras);
        leptos::task::spawn_local(async move {
            if let Ok(health) = api::get::<HealthResponse>("/health").await {
                chat.health.set(Some(health));
            }
        });
        // "Generate with this LoRA" links here with ?lora=<model_id>.
        if let Some(lora) = query.get_untracked().get("lora") {
            chat.settings.lora.set(lora);
        }
    });
    view! {
        <Title text="Chat · FLUX studio" />
        <div class="chat-layout">
            <section class="chat" aria-label="Chat">
                <Thread chat />
                <Composer chat />
            </section>
            <SettingsPanel chat />
        </div>
        <Lightbox chat />
    }
    .into_any()
}

#[component]
fn Thread(chat: ChatState) -> impl IntoView {
    let end = NodeRef::<leptos::html::Div>::new();
    Effect::new(move |_| {
        chat.thread.with(Vec::len);
        if let Some(end) = end.get() {
            end.scroll_into_view();
        }
    });
    view! {
        <div class="thread" aria-live="polite">
            <Show when=move || chat.thread.with(Vec::is_empty)>
                <Welcome chat />
            </Show>
            <For
                each=move || chat.thread.get()
                key=|item| item.id
                children=move |item| view! { <EntryView chat entry=item.entry /> }
            />
            <div node_ref=end></div>
        </div>
    }
}

#[component]
fn Welcome(chat: ChatState) -> impl IntoView {
    let examples = [
        "a lighthouse on a cliff at dusk, oil painting",
        "portrait of an old sailor, 35mm photo",
        "what can you do?",
    ];
    view! {
        <div class="welcome">
            <h1>"What shall we make?"</h1>
            <p>
                "Describe an image and the studio draws it, showing each step as it sharpens. "
                "Ask anything else and it tells you what it can do."
            </p>
            <div class="examples">
                {examples
                    .into_iter()
                    .map(|text| {
                        view! {
                            <button class="chip" on:click=move |_| chat.send(text.to_owned())>
                                {text}
                            </button>
                        }
                    })
                    .collect_view()}
            </div>
        </div>
    }
}

#[component]
fn EntryView(chat: ChatState, entry: Entry) -> impl IntoView {
    match entry {
        Entry::User { text, verdict } => view! {
            <div class="msg user">
                <p>{text}</p>
                <span class="verdict">
                    {move || match verdict.get() {
                        None => "reading…".to_string(),
                        Some(Ok(v)) => {
                            let label = match v.label {
                                Label::ImageRequest => "image request",
                                Label::Conversation => "conversation",
                            };
                            format!("{label} · {:.0}%", v.confidence * 100.0)
                        }
                        Some(Err(())) => "not classified".to_string(),
                    }}
                </span>
            </div>
        }
        .into_any(),
        Entry::Reply(paragraphs) => view! {
            <div class="msg studio reply">
                {paragraphs.into_iter().map(|p| view! { <p>{p}</p> }).collect_view()}
            </div>
        }
        .into_any(),
        Entry::Unclassified { prompt, message } => view! {
            <div class="msg studio">
                <ErrorBox message />
                <button class="secondary" on:click=move |_| chat.generate(prompt.clone())>
                    "Generate it as an image"
                </button>
            </div>
        }
        .into_any(),
        Entry::Generation { request, state } => {
            view! { <GenerationView chat request state /> }.into_any()
        }
    }
}

#[component]
fn GenerationView(
    chat: ChatState,
    request: GenerateRequest,
    state: RwSignal<GenState>,
) -> impl IntoView {
    let summary = settings_summary(&request);
    let again = request.clone();
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
            <div class="canvas">
                {move || {
                    state
                        .with(|s| {
                            if let Some(result) = &s.result {
                                let url = format!("/images/{}", result.job_id);
                                let full = url.clone();
                                view! {
                                    <button
                                        class="image-button"
                                        title="View full size"
                                        on:click=move |_| chat.lightbox.set(Some(full.clone()))
                                    >
                                        <img
                                            class="result"
                                            src=url
                                            alt=format!("Generated: {}", result.prompt)
                                            width=result.width
                                            height=result.height
                                        />
                                    </button>
                                }
                                    .into_any()
                            } else if let Some(preview) = &s.preview {
                                let sharpness = if s.total == 0 {
                                    0.0
                                } else {
                                    f64::from(s.step) / f64::from(s.total)
                                };
                                view! {
                                    <img
                                        class="preview"
                                        src=preview.clone()
                                        alt=format!("Preview at step {}", s.step)
                                        style=format!("filter: blur({:.1}px)", (1.0 - sharpness) * 6.0)
                                    />
                                }
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

/// The non-default settings of a request, in a line.
fn settings_summary(request: &GenerateRequest) -> String {
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
    parts.join(" · ")
}

/// The first block of a UUID: enough to tell a user's LoRAs apart.
pub fn short_id(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

#[component]
fn Composer(chat: ChatState) -> impl IntoView {
    let text = RwSignal::new(String::new());
    let send = move || {
        let message = text.get_untracked();
        if !message.trim().is_empty() {
            text.set(String::new());
            chat.send(message);
        }
    };
    let on_submit = move |ev: SubmitEvent| {
        ev.prevent_default();
        send();
    };
    // Enter sends, Shift+Enter starts a new line, as chat apps do.
    let on_keydown = move |ev: KeyboardEvent| {
        if ev.key() == "Enter" && !ev.shift_key() && !ev.is_composing() {
            ev.prevent_default();
            send();
        }
    };
    view! {
        <form class="composer" on:submit=on_submit>
            <label for="message" class="sr-only">
                "Message"
            </label>
            <textarea
                id="message"
                rows="2"
                placeholder="Describe an image, or ask something…"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
                on:keydown=on_keydown
            ></textarea>
            <button type="submit" disabled=move || text.with(|t| t.trim().is_empty())>
                "Send"
            </button>
        </form>
    }
}

#[component]
fn SettingsPanel(chat: ChatState) -> impl IntoView {
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

#[component]
fn Lightbox(chat: ChatState) -> impl IntoView {
    let close = NodeRef::<leptos::html::Button>::new();
    Effect::new(move |_| {
        if chat.lightbox.with(Option::is_some) {
            if let Some(button) = close.get() {
                let _ = button.focus();
            }
        }
    });
    view! {
        <Show when=move || chat.lightbox.with(Option::is_some)>
            <div
                class="lightbox"
                role="dialog"
                aria-modal="true"
                aria-label="Full-size image"
                on:click=move |_| chat.lightbox.set(None)
                on:keydown=move |ev: KeyboardEvent| {
                    if ev.key() == "Escape" {
                        chat.lightbox.set(None)
                    }
                }
            >
                <img src=move || chat.lightbox.get().unwrap_or_default() alt="Full-size image" />
                <button node_ref=close class="close" on:click=move |_| chat.lightbox.set(None)>
                    "Close"
                </button>
            </div>
        </Show>
    }
}
